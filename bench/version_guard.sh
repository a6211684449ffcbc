#!/usr/bin/env bash
# Pipelined version-guarded writes against the ceiling `redis-benchmark -P <batch> SET`,
# same value size, same clients, same keyspace, side by side in one run, alternating.
# A third contender, the script floor, sends the same keys and values through a script that
# only MSETs them (no version read or write): what passing the values through Lua costs. The
# guard keeps values out of Lua, so it is not bounded by the floor.
#
#   bench/version_guard.sh [rounds]      env: BATCH (default 500, the services' batch size) CLIENTS VALUE_SIZE WRITES KEYSPACE
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-5}
BATCH=${BATCH:-500}  # the services' default batch size
CLIENTS=${CLIENTS:-8}
VALUE_SIZE=${VALUE_SIZE:-300}
WRITES=${WRITES:-1000000}
KEYSPACE=${KEYSPACE:-100000}
DB=15  # a database of its own, flushed between runs
source bench/lib.sh

scripts/deps up redis >/dev/null
cargo build --release --quiet -p fleet --example guard_bench
bin=target/release/examples/guard_bench
cli() { redis-cli -h 127.0.0.1 -p 6379 -n "$DB" "$@"; }

ceiling=() floor=() guarded=()
for round in $(seq 1 "$ROUNDS"); do
  cli FLUSHDB >/dev/null
  rps=$(redis-benchmark -h 127.0.0.1 -p 6379 --dbnum "$DB" -c "$CLIENTS" -P "$BATCH" -d "$VALUE_SIZE" \
          -n "$WRITES" -r "$KEYSPACE" -t set --csv | awk -F'"' '$2 == "SET" {print $4}')
  ceiling+=("${rps%.*}")
  cli FLUSHDB >/dev/null
  out=$("$bin" --redis-url "redis://127.0.0.1:6379/$DB" --clients "$CLIENTS" --batch "$BATCH" \
          --value-size "$VALUE_SIZE" --writes "$WRITES" --keyspace "$KEYSPACE")
  guarded+=("${out#guarded_writes_per_sec=}")
  cli FLUSHDB >/dev/null
  out=$("$bin" --redis-url "redis://127.0.0.1:6379/$DB" --clients "$CLIENTS" --batch "$BATCH" \
          --value-size "$VALUE_SIZE" --writes "$WRITES" --keyspace "$KEYSPACE" --script-floor)
  floor+=("${out#script_floor_writes_per_sec=}")
  echo "round $round: redis-benchmark SET ${ceiling[-1]}/s, script floor ${floor[-1]}/s, version-guarded ${guarded[-1]}/s"
done
cli FLUSHDB >/dev/null

c=$(median "${ceiling[@]}"); f=$(median "${floor[@]}"); g=$(median "${guarded[@]}")
# Each round's contenders run back to back, so a round's own ratio cancels slow drifts of
# this shared machine's speed.
ratios=()
for i in "${!ceiling[@]}"; do ratios+=("$(awk -v g="${guarded[$i]}" -v c="${ceiling[$i]}" 'BEGIN {printf "%.1f", 100*g/c}')"); done
echo
echo "batch=$BATCH clients=$CLIENTS value_size=$VALUE_SIZE writes=$WRITES keyspace=$KEYSPACE rounds=$ROUNDS"
echo "median redis-benchmark -P $BATCH SET : $c writes/s"
echo "median script floor (values only)    : $f writes/s"
echo "median version-guarded pipelined     : $g writes/s"
awk -v g="$g" -v f="$f" -v c="$c" 'BEGIN {
  printf "script floor                         : %.1f%% of the ceiling\n", 100*f/c
  printf "ratio                                : %.1f%% of the ceiling (target >= 50%%), %.0f%% of the script floor\n", 100*g/c, 100*g/f }'
echo "per-round ratios                     : ${ratios[*]} (median $(median "${ratios[@]}")%)"
