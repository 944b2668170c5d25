#!/bin/bash
# How large the UDP batches of each worker are, and what a query costs, under the load of
# core_bench.py's workers rows: bench/README.md ("the window of workers") explains why
# two workers held to a CPU quota read smaller batches than one when few queries are in
# flight. Counts the system calls of the resolver's processes with perf tracepoints
# (recvmmsg per answered query is one over the batch size) and reads their CPU time from
# /proc.
#
#   sudo bench/worker_batches.sh [WORKERS] [QUOTA_PERCENT] [IN_FLIGHT] [SECONDS]
#   sudo bench/worker_batches.sh 1 20 200 5; sudo bench/worker_batches.sh 2 20 200 5
#
# Needs root (cgroup v1 cpu controller, perf), perf, dnsperf and dig. Loopback only; the
# resolver and its cgroups are removed on exit, by PID.
set -euo pipefail

WORKERS=${1:-2}
QUOTA=${2:-20}        # percent of a CPU for each process (cpu.cfs_quota_us per 10 ms)
IN_FLIGHT=${3:-200}   # dnsperf -q
SECONDS_=${4:-5}      # dnsperf -l
CLIENTS=${CLIENTS:-64}
REPO=$(cd "$(dirname "$0")/.." && pwd)
CGROUP=/sys/fs/cgroup/cpu

for tool in perf dnsperf dig; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done
[ -w "$CGROUP" ] || { echo "needs root and the cgroup v1 cpu controller at $CGROUP" >&2; exit 2; }

work=$(mktemp -d)
main=""
groups=()
cleanup() {
    [ -n "$main" ] && kill "$main" 2>/dev/null && wait "$main" 2>/dev/null
    for g in "${groups[@]}"; do rmdir "$g" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# 1,000 blocked names, as core_bench.py's blocked workload asks them.
mkdir -p "$work/lists/data"
for i in $(seq 0 999); do echo "b$i.blocked.test"; done > "$work/lists/data/bench.txt"
printf 'list: bench\naction: nxdomain\ninclude: [{file: data/bench.txt, format: domains}]\n' \
    > "$work/lists/bench.yaml"
sed 's/$/ A/' "$work/lists/data/bench.txt" > "$work/queries.txt"
echo "cache: {max_entries: 100000}" > "$work/resolver.yaml"

port=$((40000 + RANDOM % 10000))
extra=()
[ "$WORKERS" -gt 1 ] && extra=(--workers "$WORKERS")
(cd "$REPO" && exec python3 -m resolver serve --listen "127.0.0.1:$port" \
    --upstream 127.0.0.1:9 --config "$work/resolver.yaml" --blocklists "$work/lists" \
    "${extra[@]}") > "$work/log" 2>&1 &
main=$!
for _ in $(seq 100); do
    dig +short +time=1 +tries=1 -p "$port" @127.0.0.1 b1.blocked.test >/dev/null 2>&1 \
        && grep -q "ready" "$work/log" && break
    sleep 0.2
done
sleep 1
pids="$main $( (pgrep -P "$main" -f worker-child || true) | tr "\n" " ")"
for p in $pids; do
    g="$CGROUP/worker_batches.$p"
    mkdir -p "$g"
    groups+=("$g")
    echo 10000 > "$g/cpu.cfs_period_us"
    echo $((QUOTA * 100)) > "$g/cpu.cfs_quota_us"
    for t in /proc/"$p"/task/*; do echo "${t##*/}" > "$g/tasks" 2>/dev/null || true; done
done
dnsperf -s 127.0.0.1 -p "$port" -d "$work/queries.txt" -l 1 -c "$CLIENTS" -q "$IN_FLIGHT" \
    >/dev/null 2>&1   # warm the memo

ticks() { for p in $pids; do awk '{print $14 + $15}' "/proc/$p/stat"; done | awk '{t += $1} END {print t}'; }
before=$(ticks)
perf stat -x, -o "$work/stat" -p "$(echo $pids | tr ' ' ',')" \
    -e syscalls:sys_enter_recvmmsg,syscalls:sys_enter_epoll_pwait,context-switches -- \
    dnsperf -s 127.0.0.1 -p "$port" -d "$work/queries.txt" -l "$SECONDS_" -c "$CLIENTS" \
    -q "$IN_FLIGHT" > "$work/dnsperf" 2>&1
after=$(ticks)
answered=$(awk '/Queries completed/ {print $3}' "$work/dnsperf")
qps=$(awk '/Queries per second/ {print $4}' "$work/dnsperf")
hz=$(getconf CLK_TCK)
echo "workers $WORKERS, $QUOTA% CPU each, $IN_FLIGHT in flight from $CLIENTS clients:"
echo "  answered $answered ($qps qps), lost $(awk '/Queries lost/ {print $3}' "$work/dnsperf")"
awk -F, -v n="$answered" '$1 ~ /^[0-9]+$/ {
    printf "  %-32s %9d  %.4f a query\n", $3, $1, $1 / n
    if ($3 ~ /recvmmsg/ && $1 > 0) printf "  %-32s %9.1f datagrams\n", "batch (queries per recvmmsg)", n / $1
}' "$work/stat"
awk -v t=$((after - before)) -v hz="$hz" -v n="$answered" \
    'BEGIN {printf "  CPU per query %.2f us (user and kernel, from /proc)\n", t * 1e6 / hz / n}'
