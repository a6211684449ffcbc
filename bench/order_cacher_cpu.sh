#!/usr/bin/env bash
# CPU per message of order-cacher builds, side by side: N preloaded 300-byte orders (3
# partitions, version guard on) are drained by each build in turn, ROUNDS times, each drain with
# a fresh group on an empty Redis database. For each drain it prints the rate, and the CPU the
# service and Redis spent per message (from /proc/<pid>/stat before and after).
#
#   bench/order_cacher_cpu.sh [binary ...]     env: N ROUNDS BATCH PERF
#
# With no binary, the release build of the checkout. Copy a build aside to compare it with
# another: `cp target/release/order-cacher /tmp/before`, change, rebuild, then
# `bench/order_cacher_cpu.sh /tmp/before target/release/order-cacher`.
# PERF=<file> records a call-graph profile of the last build's last drain into <file>.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-1500000}
ROUNDS=${ROUNDS:-3}
BATCH=${BATCH:-500}
PORT=19103
source bench/lib.sh

binaries=("$@")
if (( ${#binaries[@]} == 0 )); then
  cargo build --release --quiet -p order-cacher
  binaries=(target/release/order-cacher)
fi
scripts/deps up redis kafka >/dev/null
bench_python

tmp=$(mktemp -d)
run=$(date +%s)
topic=bench-cpu-$run
"$py" bench/kafka_load.py produce --topic "$topic" --count "$N" >/dev/null
redis_pid=$(redis-cli info server | awk -F: '/^process_id/ {print $2+0}')

drain() {  # drain <binary> <group> [perf output]
  start_order_cacher "$1" "$topic" "$2"
  local redis_before
  redis_before=$(cpu_ticks "$redis_pid")
  if [[ -n ${3:-} ]]; then
    (sleep 0.5; perf record --call-graph dwarf,32768 -o "$3" -p "$service_pid" -- sleep 0.7 \
       >/dev/null 2>&1) &
  fi
  local out
  out=$("$py" bench/kafka_load.py drain --metrics "http://127.0.0.1:$PORT/metrics" \
          --family order_cacher_messages_total --count "$N")
  local service_ticks redis_ticks
  service_ticks=$(cpu_ticks "$service_pid")
  redis_ticks=$(( $(cpu_ticks "$redis_pid") - redis_before ))
  stop_service
  local hz
  hz=$(getconf CLK_TCK)
  awk -v o="$out" -v s="$service_ticks" -v r="$redis_ticks" -v n="$N" -v hz="$hz" -v b="$1" \
    'BEGIN {printf "%-40s %s service_cpu_us_per_msg=%.2f redis_cpu_us_per_msg=%.2f\n",
            b, o, s * 1e6 / hz / n, r * 1e6 / hz / n}'
}

for round in $(seq 1 "$ROUNDS"); do
  for i in "${!binaries[@]}"; do
    record=
    if [[ -n ${PERF:-} && $round == "$ROUNDS" && $i == $(( ${#binaries[@]} - 1 )) ]]; then
      record=$PERF
    fi
    drain "${binaries[$i]}" "bench-cpu-$run-$round-$i" "$record"
  done
done
redis-cli -n 13 flushdb >/dev/null
