#!/usr/bin/env bash
# What `redis.wait_replicas` costs: version-guarded writes to a master with one replica, with and
# without `WAIT 1` after each batch, side by side in one run, alternating. The master and its
# replica are private servers on 127.0.0.1 (ports 7311 and 7312), started here and stopped on
# exit; the replica shares the machine's two cores in both contenders.
#
#   bench/guard_wait.sh [rounds]      env: BATCH (default 500) CLIENTS VALUE_SIZE WRITES KEYSPACE
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
BATCH=${BATCH:-500}
CLIENTS=${CLIENTS:-8}
VALUE_SIZE=${VALUE_SIZE:-300}
WRITES=${WRITES:-500000}
KEYSPACE=${KEYSPACE:-100000}
MASTER=7311
REPLICA=7312
source bench/lib.sh

scripts/deps up redis >/dev/null  # installs redis-server when missing
cargo build --release --quiet -p fleet --example guard_bench
bin=target/release/examples/guard_bench
dir=$DEPS_DIR/guard-wait
rm -rf "$dir" && mkdir -p "$dir"

stop_nodes() { stop_private_redis "$REPLICA" "$MASTER"; }
trap stop_nodes EXIT
start_private_redis "$dir" "$MASTER"
start_private_redis "$dir" "$REPLICA"
redis-cli -p "$REPLICA" replicaof 127.0.0.1 "$MASTER" >/dev/null
for _ in $(seq 1 100); do
  redis-cli -p "$MASTER" info replication | grep -q 'connected_slaves:1' && break; sleep 0.1
done

run() {  # run [guard_bench flags]: prints writes/s
  redis-cli -p "$MASTER" flushall >/dev/null
  local out
  out=$("$bin" --redis-url "redis://127.0.0.1:$MASTER" --clients "$CLIENTS" --batch "$BATCH" \
          --value-size "$VALUE_SIZE" --writes "$WRITES" --keyspace "$KEYSPACE" "$@")
  echo "${out#guarded_writes_per_sec=}"
}

# A fresh replica is slow to take its first dataset (the first WAIT run gave about 94,000 writes/s
# against 210,000 to 240,000 in the rounds after it), so one run of each goes first, uncounted.
run >/dev/null
run --wait-replicas 1 >/dev/null

plain=() waited=()
for round in $(seq 1 "$ROUNDS"); do
  plain+=("$(run)")
  waited+=("$(run --wait-replicas 1)")
  echo "round $round: no WAIT ${plain[-1]}/s, WAIT 1 after each batch ${waited[-1]}/s"
done

p=$(median "${plain[@]}"); w=$(median "${waited[@]}")
echo
echo "one master, one replica; batch=$BATCH clients=$CLIENTS value_size=$VALUE_SIZE writes=$WRITES keyspace=$KEYSPACE rounds=$ROUNDS"
echo "median version-guarded, no WAIT           : $p writes/s"
echo "median version-guarded, WAIT 1 each batch : $w writes/s"
awk -v p="$p" -v w="$w" 'BEGIN { printf "ratio : %.1f%%\n", 100*w/p }'
