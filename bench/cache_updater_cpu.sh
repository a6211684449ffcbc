#!/usr/bin/env bash
# CPU per message of cache-updater variants and of the bare consumer, side by side: N preloaded
# 300-byte envelope upserts (version guard on), split over QUEUES queues, are drained by each
# variant in turn, ROUNDS times, each service run on an empty Redis database. For each drain it
# prints the rate and the CPU that the consumer, Redis and RabbitMQ spent per message (from
# /proc/<pid>/stat before and after). On a saturated machine their sum is what sets the rate.
#
#   bench/cache_updater_cpu.sh [variant ...]     env: N ROUNDS QUEUES PREFETCH
#
# A variant is `bare` (the ack-only consumer of bench/cache_updater.sh) or
# `[binary][@key=value,...]`: a cache-updater build (default: the checkout's release build) with
# `[consumer]` settings, for example `@shards=1,linger_ms=5`. Default: `bare @`.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-200000}
ROUNDS=${ROUNDS:-3}
QUEUES=${QUEUES:-1}
PREFETCH=${PREFETCH:-5000}
PORT=19104
source bench/lib.sh

variants=("$@")
(( ${#variants[@]} > 0 )) || variants=(bare @)
scripts/deps up redis rabbitmq >/dev/null
cargo build --release --quiet -p cache-updater --bin cache-updater --example amqp_bench
tool=target/release/examples/amqp_bench

tmp=$(mktemp -d)
run=$(date +%s)
redis_pid=$(redis-cli info server | awk -F: '/^process_id/ {print $2+0}')
rabbit_pid=$(pgrep -f beam.smp | head -1)
# start_service <binary> <settings> <prefix>: the service on <prefix>'s queues, in the background
start_service() {
  local q
  {
    printf '[topology]\nexchange = ""\ndead_letter_exchange = "%s.dlx"\ndead_letter_queue = "%s.dlq"\n' "$3" "$3"
    printf '[consumer]\nprefetch = %s\n' "$PREFETCH"
    if [[ -n $2 ]]; then tr ',' '\n' <<<"$2"; fi
    for q in $(queues "$3"); do printf '[[queues]]\nname = "%s"\n' "$q"; done
  } >"$tmp/config.toml"
  redis-cli -n 13 flushdb >/dev/null
  REDIS_URL=redis://127.0.0.1:6379/13 launch_service "$1" "$tmp/config.toml"
  until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do sleep 0.1; done
}

# drain <variant> <prefix>: prints one line for one drain of N messages
drain() {
  local variant=$1 q=$2 out consumer_ticks redis_before rabbit_before
  if [[ $variant == bare ]]; then
    publish "$q" "$N"
    redis_before=$(cpu_ticks "$redis_pid") rabbit_before=$(cpu_ticks "$rabbit_pid")
    out=$( { /usr/bin/time -f "ticks=%U %S" "$tool" bare --queue "$(list "$q")" --count "$N" \
               --prefetch "$PREFETCH" --ack-every $((PREFETCH / 4)); } 2>&1 )
    consumer_ticks=$(awk -v hz="$(getconf CLK_TCK)" '/^ticks=/ {sub("ticks=", ""); print ($1 + $2) * hz}' <<<"$out")
    out=$(grep msgs_per_sec <<<"$out")
    delete_amqp $(queues "$q")
  else
    local binary=${variant%%@*} settings=
    [[ $variant == *@* ]] && settings=${variant#*@}
    binary=${binary:-cache-updater}
    # The service declares its queues with a dead-letter exchange, so it starts first.
    start_service "$binary" "$settings" "$q"
    stop_service
    publish "$q" "$N"
    # The service's whole life is counted: its start-up is a few milliseconds of CPU.
    redis_before=$(cpu_ticks "$redis_pid") rabbit_before=$(cpu_ticks "$rabbit_pid")
    start_service "$binary" "$settings" "$q"
    out=$("$tool" drain --metrics "http://127.0.0.1:$PORT/metrics" --family cache_updater_messages_total --count "$N")
    consumer_ticks=$(cpu_ticks "$service_pid")
    stop_service
    delete_amqp $(queues "$q") "$q.dlq" "$q.dlx"
  fi
  local redis_ticks=$(( $(cpu_ticks "$redis_pid") - redis_before ))
  local rabbit_ticks=$(( $(cpu_ticks "$rabbit_pid") - rabbit_before ))
  awk -v o="$out" -v c="$consumer_ticks" -v r="$redis_ticks" -v b="$rabbit_ticks" -v n="$N" \
      -v hz="$(getconf CLK_TCK)" -v v="$variant" 'BEGIN {
    u = 1e6 / hz / n
    printf "%-36s %-20s consumer_us=%.2f redis_us=%.2f rabbitmq_us=%.2f total_us=%.2f\n",
           v, o, c * u, r * u, b * u, (c + r + b) * u }'
}

for round in $(seq 1 "$ROUNDS"); do
  for i in "${!variants[@]}"; do
    drain "${variants[$i]}" "bench-cpu-$run-$round-$i"
  done
done
redis-cli -n 13 flushdb >/dev/null
