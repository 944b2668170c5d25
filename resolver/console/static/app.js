// The resolver's console: plain JavaScript, no framework. Everything shown comes from the
// admin API's JSON and goes into the page as text (textContent), never as HTML.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const loginUsed = document.querySelector('meta[name="console-login"]').content === "yes";
const $ = (id) => document.getElementById(id);

// An element with attributes and children; strings become text nodes.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// A link only for http(s) URLs; anything else is shown as text.
function safeLink(url, text) {
  try {
    const parsed = new URL(url);
    if (parsed.protocol === "http:" || parsed.protocol === "https:") {
      return el("a", { href: parsed.href, target: "_blank", rel: "noopener noreferrer" }, text || url);
    }
  } catch (_) { /* not a URL */ }
  return document.createTextNode(text || url || "");
}

// The first http(s) URL in a reference text, if any.
function urlIn(text) {
  const match = /https?:\/\/[^\s<>"')]+/.exec(text || "");
  return match ? match[0] : null;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function notice(text) {
  $("notice").textContent = text || "";
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// A call to the admin API with the session cookie; state-changing calls carry the CSRF token.
async function api(path, options = {}) {
  const init = { method: options.method || "GET", credentials: "same-origin", headers: {} };
  if (init.method !== "GET") init.headers["X-CSRF-Token"] = csrf;
  if (options.json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    window.location.assign("/console");  // the session ended: log in again
    throw new ApiError(401, "session ended");
  }
  const type = response.headers.get("Content-Type") || "";
  const doc = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, (doc && doc.error) || String(doc));
  return doc;
}

// Instants: an ISO 8601 text shown in a time zone (the list's own when known).
function inZone(iso, zone) {
  if (!iso || iso === "never" || iso === "always") return iso || "—";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  if (!zone) return iso;
  try {
    const text = new Intl.DateTimeFormat("sv-SE", {
      timeZone: zone, year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit",
    }).format(date);
    return `${text} ${zone}`;
  } catch (_) {
    return iso;
  }
}

function countdown(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "none";
  if (seconds <= 0) return "now";
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = Math.floor(seconds % 60);
  const hms = `${String(h).padStart(2, "0")}:${String(m).padStart(2, "0")}:${String(s).padStart(2, "0")}`;
  return d ? `${d} d ${hms}` : hms;
}

// ---- Policy timeline -------------------------------------------------------------------

let timers = [];  // [element, instant in ms] of the countdowns shown

function stateBadge(state) {
  return el("span", { class: `state state-${state}`, "data-state": state }, state);
}

function windowText(item) {
  const zone = item.timezone || null;
  const parts = [];
  if (item.monitor_from) parts.push(`monitor from ${inZone(item.monitor_from, zone)},`);
  const started = item.state === "enforced" || item.state === "expired";
  if (item.enforced_from) parts.push(`enforced ${started ? "since" : "from"} ${inZone(item.enforced_from, zone)}`);
  if (item.until && item.until !== "never") parts.push(`until ${inZone(item.until, zone)}`);
  if (!zone && item.enforced_from) parts.push("(UTC)");
  return parts.join(" ") || "always";
}

// A live countdown cell to an item's next change of state.
function nextCell(item, zone) {
  const due = item.next_transition && item.next_transition !== "never"
    ? Date.parse(item.next_transition) : null;
  const clock = el("span", { class: "countdown" }, "");
  if (due !== null && !Number.isNaN(due)) timers.push([clock, due]);
  else clock.textContent = "none";
  return el("td", {}, clock, due ? el("div", { class: "hint" }, inZone(item.next_transition, zone)) : null);
}

function referenceCell(item) {
  const url = item.reference_url || urlIn(item.reference);
  return el("td", {}, url ? safeLink(url, item.reference || url) : (item.reference || "—"));
}

function timelineRuleRow(rule, zones) {
  const zone = zones[rule.list] || null;
  return el("tr", { "data-rule": rule.name || "" },
    el("td", {}, rule.name || "—"), el("td", {}, rule.list), el("td", {}, stateBadge(rule.state)),
    el("td", {}, windowText({ ...rule, timezone: zone })), nextCell(rule, zone),
    referenceCell(rule), el("td", { class: "hint" }, rule.where || ""));
}

function timelineRow(item) {
  const next = nextCell(item, item.timezone);
  const reference = referenceCell(item);
  const groups = item.would_block_by_group || {};
  const groupText = Object.keys(groups).length
    ? Object.entries(groups).map(([g, n]) => `${g}: ${n}`).join(", ")
    : (item.state === "monitor" || item.mode === "monitor" ? String(item.would_block || 0) : "—");
  return el("tr", { "data-list": item.id },
    el("td", {}, el("strong", {}, item.id), el("div", { class: "hint" }, item.description || "")),
    el("td", {}, stateBadge(item.state)),
    el("td", { class: "window" }, windowText(item)),
    next, reference,
    el("td", { class: "num" }, item.rules ?? "—"),
    el("td", { class: "num" }, item.blocked ?? 0),
    el("td", { class: "would" }, groupText));
}

async function loadTimeline() {
  let lists;
  let rules = [];
  let note = "";
  try {
    const doc = await api("/v1/timeline");
    lists = doc.lists;
    rules = doc.rules || [];
    if (doc.rules_truncated) note = "Only the first rules with windows are shown.";
  } catch (err) {
    if (err.status !== 404) throw err;
    lists = (await api("/v1/status")).lists || [];
    note = "Times in UTC (this server has no /v1/timeline).";
  }
  timers = [];
  const zones = Object.fromEntries(lists.map((l) => [l.id, l.timezone]));
  fill($("timeline-rows"), lists.map(timelineRow));
  fill($("timeline-rules"), rules.length ? rules.map((r) => timelineRuleRow(r, zones))
    : [el("tr", {}, el("td", { colspan: "7", class: "hint" }, "None: every rule follows its list's window."))]);
  $("timeline-note").textContent = note;
  tick();
  // For bench/console.py: when the page first became usable.
  if (!performance.getEntriesByName("timeline-drawn").length) performance.mark("timeline-drawn");
}

function tick() {
  const now = Date.now();
  for (const [node, due] of timers) node.textContent = countdown((due - now) / 1000);
}

// ---- Live ------------------------------------------------------------------------------

let previous = null;  // [answers, ms] of the last poll

async function loadLive() {
  const doc = await api("/v1/status");
  const answers = (doc.workers || []).reduce((sum, w) => sum + (w.answers || 0), 0);
  const now = performance.now();
  if (previous && now > previous[1]) {
    const qps = ((answers - previous[0]) * 1000) / (now - previous[1]);
    $("live-qps").textContent = Math.max(0, qps).toFixed(1);
  }
  previous = [answers, now];
  const policy = doc.policy || {};
  $("live-reload").textContent = `${policy.loaded_at || "—"}${policy.last_reload_failed ? " (last reload failed)" : ""}`;
  $("live-error").textContent = policy.last_reload_error ? `Reload error: ${policy.last_reload_error}` : "";
  const cert = doc.certificate;
  $("live-cert").textContent = cert ? `${cert.subject || ""} expires ${cert.not_after} (${cert.days_left} days)${cert.last_error ? `; ${cert.last_error}` : ""}` : "none";
  fill($("live-lists"), (doc.lists || []).map((l) => el("tr", {},
    el("td", {}, l.id), el("td", {}, stateBadge(l.state)),
    el("td", { class: "num" }, l.blocked), el("td", { class: "num" }, l.would_block))));
  fill($("live-upstreams"), (doc.upstreams || []).map((u) => el("tr", {},
    el("td", {}, u.address), el("td", {}, u.transport),
    el("td", {}, u.healthy ? "healthy" : "down"), el("td", { class: "num" }, u.consecutive_failures))));
}

// ---- Investigations --------------------------------------------------------------------

let searchParams = null;
let nextCursor = null;

function formParams(form) {
  const params = new URLSearchParams();
  for (const [key, value] of new FormData(form)) if (String(value).trim()) params.set(key, String(value).trim());
  return params;
}

function queryRow(row) {
  const client = el("a", { class: "client", href: "#", on: { click: (e) => { e.preventDefault(); byClient(row.client); } } }, row.client);
  return el("tr", {},
    el("td", {}, row.time), el("td", {}, client), el("td", {}, (row.groups || []).join(", ")),
    el("td", {}, row.qname), el("td", {}, row.qtype),
    el("td", { class: `decision-${row.decision}` }, row.decision),
    el("td", {}, row.list || ""), el("td", {}, row.reference || ""));
}

async function search(params, append) {
  const doc = await api(`/v1/queries?${params}`);
  const rows = doc.queries.map(queryRow);
  if (append) $("search-rows").append(...rows); else fill($("search-rows"), rows);
  nextCursor = doc.next_cursor;
  $("next-page").hidden = !nextCursor;
  $("search-note").textContent = `${$("search-rows").children.length} queries shown`;
  const csv = new URLSearchParams(params);
  csv.delete("cursor");
  csv.delete("limit");  // every matching row, not the page shown (the server bounds it)
  csv.set("format", "csv");
  $("csv").href = `/v1/queries?${csv}`;
  if (!append) await loadClients(params);
}

function byClient(client) {
  const form = $("search");
  form.reset();
  form.elements.client.value = client;
  form.requestSubmit();
}

// Per client within the search's filters: "which clients tried this name since that date?"
async function loadClients(params) {
  const filters = new URLSearchParams(params || "");
  filters.delete("cursor");
  filters.delete("limit");
  try {
    const doc = await api(`/v1/queries/clients?${filters}`);
    const clients = doc.clients || [];
    fill($("client-rows"), clients.map((c) => el("tr", {},
      el("td", {}, el("a", { class: "client", href: "#", on: { click: (e) => { e.preventDefault(); byClient(c.client); } } }, c.client)),
      el("td", { class: "num" }, c.total ?? ""), el("td", { class: "num" }, c.blocked ?? ""),
      el("td", { class: "num" }, c.would_block ?? ""), el("td", {}, c.last_seen || ""))));
    $("clients-note").textContent = "";
  } catch (err) {
    $("clients-note").textContent = err.status === 404
      ? "Per-client counts are not available on this server; click a client in the results instead."
      : err.message;
  }
}

// ---- Explain ---------------------------------------------------------------------------

function explainView(doc) {
  const dl = el("dl", {},
    el("dt", {}, "Decision"), el("dd", { class: `decision-${doc.decision}`, id: "explain-decision" }, doc.decision),
    el("dt", {}, "Name"), el("dd", {}, `${doc.name} ${doc.type}`),
    el("dt", {}, "Client"), el("dd", {}, `${doc.client}${(doc.groups || []).length ? ` (groups: ${doc.groups.join(", ")})` : ""}`),
    el("dt", {}, "At"), el("dd", {}, `${doc.at} (${doc.zone})`),
    el("dt", {}, "List"), el("dd", {}, doc.list || "—"),
    el("dt", {}, "Until"), el("dd", {}, doc.until || "—"));
  const rules = (doc.rules || []).map((r) => {
    const w = r.window || {};
    const span = [w.monitor_from && `monitor from ${w.monitor_from}`, w.from && `from ${w.from}`, w.until && w.until !== "never" && `until ${w.until}`].filter(Boolean).join(", ");
    const url = urlIn(r.reference);
    return el("tr", {}, el("td", {}, r.rule), el("td", {}, r.list), el("td", {}, stateBadge(r.state)),
      el("td", {}, span || "always"), el("td", {}, url ? safeLink(url, r.reference) : (r.reference || "—")),
      el("td", {}, (r.source || []).join(", ")));
  });
  const table = el("table", {}, el("thead", {}, el("tr", {}, ...["Rule", "List", "State", "Window", "Reference", "Source"].map((h) => el("th", {}, h)))), el("tbody", {}, rules));
  return [dl, el("h3", {}, "Rules that name it"), rules.length ? table : el("p", { class: "hint" }, "No rule names it.")];
}

// ---- Rules -----------------------------------------------------------------------------

const RULES_ABSENT = "Rule edits are not available on this server yet (POST /v1/rules answers 404).";

async function loadRules() {
  try {
    const doc = await api("/v1/rules");
    fill($("rule-rows"), (doc.rules || []).map((r) => el("tr", {},
      el("td", {}, r.name), el("td", {}, r.list || doc.list || ""),
      el("td", {}, urlIn(r.reference) ? safeLink(urlIn(r.reference), r.reference) : (r.reference || "")),
      el("td", {}, [r.from && `from ${r.from}`, r.until && `until ${r.until}`, r.timezone].filter(Boolean).join(" ") || "always"),
      el("td", {}, [r.operator, r.added_at].filter(Boolean).join(", ")),
      el("td", {}, el("button", { type: "button", on: { click: () => removeRule(r) } }, "Remove")))));
    const changes = await api("/v1/changes");
    fill($("change-rows"), (changes.changes || []).map((c) => el("tr", {},
      el("td", {}, c.time || c.when || ""), el("td", {}, c.operator || c.who || ""),
      el("td", {}, c.action || c.what || ""), el("td", {}, c.name || ""),
      el("td", {}, c.reference || c.why || ""))));
  } catch (err) {
    $("rules-note").textContent = err.status === 404 ? RULES_ABSENT : err.message;
  }
}

// A removal has a basis of its own (the decision that lifts the ban), never the one the
// rule was added with: the change log must say why each change was made.
async function removeRule(rule) {
  const fields = $("rule-form").elements;
  const operator = fields.operator.value.trim();
  const reference = fields.reference.value.trim();
  if (!operator || !reference || reference === rule.reference) {
    $("rules-note").textContent = `To remove ${rule.name}, give your name in Operator and the basis for lifting it in Reference.`;
    return;
  }
  try {
    await api("/v1/rules/remove", { method: "POST", json: { name: rule.name, reference, operator } });
    $("rules-note").textContent = `Removed ${rule.name}.`;
    await loadRules();
  } catch (err) {
    $("rules-note").textContent = err.status === 404 ? RULES_ABSENT : err.message;
  }
}

async function addRule(event) {
  event.preventDefault();
  const body = {};
  for (const [key, value] of new FormData(event.target)) if (String(value).trim()) body[key] = String(value).trim();
  if (body.allow_tld) body.allow_tld = true;  // the checkbox: a JSON boolean
  try {
    const doc = await api("/v1/rules", { method: "POST", json: body });
    const change = (doc && doc.change) || {};
    const warning = change.warning ? ` Warning: ${change.warning}.` : "";
    $("rules-note").textContent = `Added ${body.name}${change.file ? ` to ${change.file}` : ""}.${warning}`;
    await loadRules();
  } catch (err) {
    $("rules-note").textContent = err.status === 404 ? RULES_ABSENT : err.message;
  }
}

// ---- Tabs and polling ------------------------------------------------------------------

const loaders = { timeline: loadTimeline, live: loadLive, investigations: () => loadClients(searchParams), explain: null, rules: loadRules };
let current = "timeline";

function guarded(fn) {
  return (...args) => Promise.resolve(fn(...args)).then(() => notice(""), (err) => { if (err.status !== 401) notice(err.message); });
}

function show(tab) {
  current = tab;
  for (const button of document.querySelectorAll("#tabs button")) button.classList.toggle("active", button.dataset.tab === tab);
  for (const section of document.querySelectorAll("section.tab")) section.hidden = section.id !== tab;
  if (loaders[tab]) guarded(loaders[tab])();
}

function start() {
  for (const button of document.querySelectorAll("#tabs button")) button.addEventListener("click", () => show(button.dataset.tab));
  $("logout").hidden = !loginUsed;
  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    searchParams = formParams(e.target);
    guarded(search)(searchParams, false);
  });
  $("next-page").addEventListener("click", () => {
    const params = new URLSearchParams(searchParams);
    params.set("cursor", nextCursor);
    guarded(search)(params, true);
  });
  $("explain-form").addEventListener("submit", (e) => {
    e.preventDefault();
    guarded(async () => $("explain-out").replaceChildren(...explainView(await api(`/v1/explain?${formParams(e.target)}`))))();
  });
  $("rule-form").addEventListener("submit", addRule);
  setInterval(tick, 1000);
  // Live polls every 2 s while shown; the timeline refreshes every 30 s.
  setInterval(() => { if (current === "live" && !document.hidden) guarded(loadLive)(); }, 2000);
  setInterval(() => { if (current === "timeline" && !document.hidden) guarded(loadTimeline)(); }, 30000);
  show(window.location.hash.slice(1) in loaders ? window.location.hash.slice(1) : "timeline");
  document.body.dataset.ready = "yes";
}

start();
