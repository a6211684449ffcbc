#!/usr/bin/env bash
# cache-updater end to end, side by side in one run, alternating each round:
#   bare     a Rust consumer that only acks, at the same prefetch: the ceiling acks in runs
#            (multiple=true every PREFETCH/4 messages, as the service does); also shown
#            acking each message
#   service  the release cache-updater draining N preloaded 300-byte envelope upserts
#            (version guard on), timed from its first handled message to its last
#   naive    a per-message Python consumer (pika, then redis-py SET, then ack)
# and the service's peak RSS. With QUEUES=k each contender takes its load from k queues, N/k
# each (one channel and consumer per queue; the naive consumer, one consumer per queue on its
# one channel): a broker gives one queue one process, so this raises the broker's ceiling.
#
#   bench/cache_updater.sh [rounds]     env: N NAIVE_N PREFETCH SHARDS BATCH QUEUES DEPS_DIR
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
N=${N:-200000}
NAIVE_N=${NAIVE_N:-20000}
PREFETCH=${PREFETCH:-5000}  # tuned: the service keeps the broker busier with a deeper window (83% of bare at 2,000, 90% at 5,000)
SHARDS=${SHARDS:-4}
BATCH=${BATCH:-500}
QUEUES=${QUEUES:-1}
PORT=19101
source bench/lib.sh

scripts/deps up redis rabbitmq >/dev/null
cargo build --release --quiet -p cache-updater --bin cache-updater --example amqp_bench
tool=target/release/examples/amqp_bench
bench_python

# start_service <prefix>: runs cache-updater in the background on $PORT, consuming <prefix>'s queues
start_service() {
  local q
  cat >"$tmp/config.toml" <<TOML
[topology]
exchange = ""
dead_letter_exchange = "$1.dlx"
dead_letter_queue = "$1.dlq"
[consumer]
prefetch = $PREFETCH
shards = $SHARDS
batch_size = $BATCH
TOML
  for q in $(queues "$1"); do printf '[[queues]]\nname = "%s"\n' "$q" >>"$tmp/config.toml"; done
  # A database of its own, flushed before each run: every round writes fresh keys, so the
  # round measures applied writes, not duplicates of the round before.
  redis-cli -n 13 flushdb >/dev/null
  REDIS_URL=redis://127.0.0.1:6379/13 launch_service cache-updater "$tmp/config.toml"
}


tmp=$(mktemp -d)
run=$(date +%s)
bare=() bare1=() service=() naive=() rss=()
for round in $(seq 1 "$ROUNDS"); do
  q=bench-cu-$run-$round

  publish "$q.bare" "$N"
  out=$("$tool" bare --queue "$(list "$q.bare")" --count "$N" --prefetch "$PREFETCH" --ack-every $((PREFETCH / 4)))
  bare+=("${out#msgs_per_sec=}")
  delete_amqp $(queues "$q.bare")
  publish "$q.bare1" "$N"
  out=$("$tool" bare --queue "$(list "$q.bare1")" --count "$N" --prefetch "$PREFETCH" --ack-every 1)
  bare1+=("${out#msgs_per_sec=}")
  delete_amqp $(queues "$q.bare1")

  # The service declares its queue with a dead-letter exchange, so it starts first.
  start_service "$q"
  until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do sleep 0.1; done
  stop_service
  publish "$q" "$N"
  start_service "$q"
  out=$("$tool" drain --metrics "http://127.0.0.1:$PORT/metrics" --family cache_updater_messages_total --count "$N")
  service+=("${out#msgs_per_sec=}")
  rss+=("$(peak_rss_mib)")
  stop_service
  delete_amqp $(queues "$q") "$q.dlq" "$q.dlx"

  publish "$q.naive" "$NAIVE_N"
  out=$("$py" bench/cache_updater_naive.py --queue "$(list "$q.naive")" --count "$NAIVE_N" --prefetch "$PREFETCH")
  naive+=("${out#msgs_per_sec=}")
  delete_amqp $(queues "$q.naive")
  echo "round $round: bare ${bare[-1]}/s (acking each: ${bare1[-1]}/s)  cache-updater ${service[-1]}/s (peak RSS ${rss[-1]} MiB)  naive ${naive[-1]}/s"
done
for db in 13 14; do redis-cli -n $db flushdb >/dev/null; done

b=$(median "${bare[@]}"); b1=$(median "${bare1[@]}"); s=$(median "${service[@]}"); n=$(median "${naive[@]}"); r=$(median "${rss[@]}")
echo
echo "N=$N naive_N=$NAIVE_N prefetch=$PREFETCH shards=$SHARDS batch=$BATCH queues=$QUEUES rounds=$ROUNDS value_size=300"
echo "median bare consumer (ack only)    : $b msg/s ($b1 msg/s acking each message)"
echo "median cache-updater end to end    : $s msg/s, peak RSS $r MiB"
echo "median naive Python consumer       : $n msg/s"
awk -v s="$s" -v b="$b" -v n="$n" 'BEGIN {
  printf "cache-updater / bare               : %.0f%% (target >= 70%%)\n", 100*s/b
  printf "cache-updater / naive              : %.1fx (target >= 10x)\n", s/n }'
echo "peak RSS                           : $r MiB (target < 64 MiB)"
