#!/usr/bin/env bash
# Two independent single-GPU job lists side by side on a two-GPU device machine (one lane per GPU),
# so one device call measures twice as much. Each lane's commands run in order in their own shell
# with CUDA_VISIBLE_DEVICES set; every ratio a benchmark reports still comes from rows of one
# invocation on one GPU (the other GPU's lane shares only the host's 32 cores).
#
#   bash benchmarks/two_lanes.sh DEADLINE_S "lane-0 commands" "lane-1 commands"
#
# Logs: $OUT/lane0.log, $OUT/lane1.log. Files of benchmarks/results/ written by this call are copied to
# $OUT/benchmarks/results every 15 s and at the end, so rows written before the deadline come back even when a lane is cut. At DEADLINE_S
# seconds both lanes are killed (set it ~40 s under the call's limit).
set -u
deadline=${1:?deadline seconds}; lane0=${2:?lane 0 commands}; lane1=${3:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
marker=$(mktemp); start=$(date +%s)
# only what this call wrote (the device returns a limited number of files)
copy() { find benchmarks/results -type f -newer "$marker" -exec cp --parents {} "$OUT/" \; 2>/dev/null; }
CUDA_VISIBLE_DEVICES=0 setsid bash -xc "$lane0" >"$OUT/lane0.log" 2>&1 &
p0=$!
p1=
if [ -n "$lane1" ]; then
  CUDA_VISIBLE_DEVICES=1 setsid bash -xc "$lane1" >"$OUT/lane1.log" 2>&1 &
  p1=$!
fi
while kill -0 $p0 2>/dev/null || { [ -n "$p1" ] && kill -0 $p1 2>/dev/null; }; do
  sleep 15; copy
  if [ $(( $(date +%s) - start )) -ge "$deadline" ]; then
    echo "deadline ${deadline}s: killing the lanes still running"
    kill -TERM -- -$p0 2>/dev/null; [ -n "$p1" ] && kill -TERM -- -$p1 2>/dev/null
    sleep 5; kill -KILL -- -$p0 2>/dev/null; [ -n "$p1" ] && kill -KILL -- -$p1 2>/dev/null; break
  fi
done
wait 2>/dev/null
copy
for l in 0 1; do [ -f "$OUT/lane$l.log" ] && { echo "== lane $l (tail)"; tail -n 25 "$OUT/lane$l.log"; }; done
echo "elapsed $(( $(date +%s) - start )) s"
