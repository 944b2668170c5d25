#!/usr/bin/env python3
"""Policy scale: load time, resident memory per domain, and lookup cost, by list size.

For each size (default 1,000, 100,000 and 1,000,000 domains) this writes list files (ten
lists, each including a plain domain file, like imported third-party lists), then in a fresh
Python process for each measurement:

- loads the policy with ``resolver.policy.load_policy`` and reports the load time and the
  growth of resident memory (VmRSS) per domain;
- does the same with a plain Python ``set`` of the names, the peer (about 100 bytes a name);
- times ``Policy.decide`` for names in the lists (hits, 3 labels deep under a listed name)
  and for names not in them (misses), in microseconds per call.

Run: ``python3 bench/policy_scale.py [--sizes 1000,100000,1000000] [--json out.json]``.
Targets (policy issue): 1,000,000 domains load in under 2 s and cost under 40 bytes per
domain; lookup cost does not grow with list size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTS = 10


def write_lists(folder: Path, size: int) -> None:
    per_list = size // LISTS
    for index in range(LISTS):
        data = folder / "data" / f"list{index}.txt"
        data.parent.mkdir(parents=True, exist_ok=True)
        with data.open("w") as out:
            for n in range(per_list):
                out.write(f"host{n}.zone{index}-{n % 997}.example\n")
        (folder / f"list{index}.yaml").write_text(
            f"list: list{index}\ninclude: [{{file: data/list{index}.txt, format: domains}}]\n"
        )


MEASURE = textwrap.dedent(
    """
    import gc, json, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    folder = Path({folder!r})
    size = {size}
    kind = {kind!r}
    gc.collect()
    before = rss()
    started = time.perf_counter()
    if kind == "resolver":
        from resolver.policy import load_policy
        from resolver.core.wire import encode_name, label_offsets
        before = rss()  # the import is not the policy
        started = time.perf_counter()
        policy = load_policy(folder)
        loaded = time.perf_counter() - started
        gc.collect()
        grown = rss() - before
        per_list = size // {lists}
        step = max(1, per_list // 200)
        hits = [
            f"a.b.host{{n}}.zone{{i}}-{{n % 997}}.example"
            for i in range(10) for n in range(0, per_list, step)
        ][:2000]
        misses = [f"www.site{{n}}.example.org" for n in range(2000)]
        def timed(names):
            wires = [encode_name(n) for n in names]
            offsets = [label_offsets(w) for w in wires]
            decide = policy.decide
            t = time.perf_counter()
            for _ in range(5):
                for w, o in zip(wires, offsets):
                    decide(w, o, 1, 0.0)
            return (time.perf_counter() - t) / (5 * len(names)) * 1e6
        hit_us = timed(hits)
        miss_us = timed(misses)
        assert policy.name_count == size, policy.name_count
        result = {{"load_s": loaded, "rss_bytes": grown, "hit_us": hit_us, "miss_us": miss_us}}
        print(json.dumps(result))
    else:
        names = set()
        for file in sorted((folder / "data").glob("*.txt")):
            for line in file.read_text().splitlines():
                names.add(line)
        loaded = time.perf_counter() - started
        gc.collect()
        grown = rss() - before
        print(json.dumps({{"load_s": loaded, "rss_bytes": grown}}))
    """
)


def measure(folder: Path, size: int, kind: str) -> dict[str, float]:
    code = MEASURE.format(root=str(ROOT), folder=str(folder), size=size, kind=kind, lists=LISTS)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="policy-scale-") as tmp:
            folder = Path(tmp)
            write_lists(folder, size)
            ours = measure(folder, size, "resolver")
            peer = measure(folder, size, "set")
        rows.append({"domains": size, "resolver": ours, "python_set": peer})
        # Below ~10,000 domains the growth is lost in allocator noise (it can be negative).
        per_domain = f"{ours['rss_bytes'] / size:6.1f}" if size >= 10_000 else "   n/a"
        print(
            f"{size:>9,} domains: load {ours['load_s']:.2f} s, "
            f"{per_domain} B/domain (python set: {peer['rss_bytes'] / size:6.1f} B/domain), "
            f"decide hit {ours['hit_us']:.2f} us, miss {ours['miss_us']:.2f} us",
            flush=True,
        )
    if len(rows) > 1:
        first, last = rows[0]["resolver"], rows[-1]["resolver"]
        print(
            f"lookup cost, largest/smallest: hit {last['hit_us'] / first['hit_us']:.2f}x, "
            f"miss {last['miss_us'] / first['miss_us']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
