#!/usr/bin/env bash
# Before/after comparison of `macula bench pubsub`: runs two macula binaries
# alternately, N times each (default 5), and prints one summary line per run.
#
#   scripts/bench-pubsub-pairs.sh OLD_BINARY NEW_BINARY [N] [-- EXTRA ARGS FOR NEW]
#
# Build the old binary from a worktree, e.g.:
#   git worktree add /tmp/base <commit> && (cd /tmp/base && CARGO_TARGET_DIR=$PWD/../base-target cargo build --release -p macula-cli)
set -euo pipefail
old=${1:?old binary}
new=${2:?new binary}
n=${3:-5}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
extra=("$@")
summary='
import json, sys
v = json.load(sys.stdin)
f = v.get("fanout") or {}
o = v["latency_one_in_flight"]["one_way"]
t64, t1k = v["throughput_64"], v["throughput_1k"]
print(sys.argv[1], "load", sys.argv[2],
      "| at 10k msgs/s p50/p99/p99.9 %.0f/%.0f/%.0f us" % (v["p50_us"], v["p99_us"], v["p999_us"]),
      "| one in flight p50/p99 %.0f/%.0f us" % (o["p50_us"], o["p99_us"]),
      "| 64 B %.2f M/s (published %.2f M/s, dropped %d)" % (t64["delivered_per_sec"] / 1e6, t64["published_per_sec"] / 1e6, t64["dropped_at_publisher"]),
      "| 1 KiB %.0f k/s (dropped %d)" % (t1k["delivered_per_sec"] / 1e3, t1k["dropped_at_publisher"]),
      "| fan-out %.2f M/s (dropped %d)" % (f.get("total_delivered_per_sec", 0) / 1e6, f.get("dropped_at_publisher", 0)))
'
for _ in $(seq "$n"); do
  for which in old new; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if [ "$which" = old ]; then
      "$old" bench pubsub --json 2>/dev/null | python3 -c "$summary" old "$load"
    else
      "$new" bench pubsub --json "${extra[@]}" 2>/dev/null | python3 -c "$summary" new "$load"
    fi
  done
done
