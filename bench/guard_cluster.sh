#!/usr/bin/env bash
# Version-guarded writes on a Redis Cluster against the ceiling `redis-benchmark --cluster -P
# <batch> SET`, same value size and clients, side by side in one run, alternating. The cluster
# is three private masters on 127.0.0.1 (ports 7301-7303), started here and stopped on exit.
# Keys carry no hash tag, so each key is one script call (a call keeps to one hash slot); a batch
# goes out as one pipeline of such calls per node.
#
#   bench/guard_cluster.sh [rounds]      env: BATCH (default 500) CLIENTS VALUE_SIZE WRITES KEYSPACE
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
BATCH=${BATCH:-500}
CLIENTS=${CLIENTS:-8}
VALUE_SIZE=${VALUE_SIZE:-300}
WRITES=${WRITES:-300000}
KEYSPACE=${KEYSPACE:-100000}
PORTS=(7301 7302 7303)
source bench/lib.sh

scripts/deps up redis >/dev/null  # installs redis-server when missing
cargo build --release --quiet -p fleet --example guard_bench
bin=target/release/examples/guard_bench
dir=$DEPS_DIR/guard-cluster
rm -rf "$dir" && mkdir -p "$dir"

stop_nodes() { stop_private_redis "${PORTS[@]}"; }
trap stop_nodes EXIT
for port in "${PORTS[@]}"; do
  start_private_redis "$dir" "$port" --cluster-enabled yes --cluster-config-file "nodes-$port.conf"
done
redis-cli --cluster create "${PORTS[@]/#/127.0.0.1:}" --cluster-yes >/dev/null
# Every node must see the cluster up: one that does not yet answers CLUSTERDOWN.
for port in "${PORTS[@]}"; do
  for _ in $(seq 1 100); do
    redis-cli -p "$port" cluster info | grep -q cluster_state:ok && break; sleep 0.1
  done
done
flush() { for port in "${PORTS[@]}"; do redis-cli -p "$port" flushall >/dev/null; done; }

ceiling=() guarded=()
for round in $(seq 1 "$ROUNDS"); do
  flush
  rps=$(redis-benchmark --cluster -h 127.0.0.1 -p "${PORTS[0]}" -c "$CLIENTS" -P "$BATCH" \
          -d "$VALUE_SIZE" -n "$WRITES" -r "$KEYSPACE" -t set --csv | awk -F'"' '$2 == "SET" {print $4}')
  ceiling+=("${rps%.*}")
  flush
  out=$("$bin" --cluster --redis-url "redis://127.0.0.1:${PORTS[0]}" --clients "$CLIENTS" \
          --batch "$BATCH" --value-size "$VALUE_SIZE" --writes "$WRITES" --keyspace "$KEYSPACE")
  guarded+=("${out#guarded_writes_per_sec=}")
  echo "round $round: redis-benchmark --cluster SET ${ceiling[-1]}/s, version-guarded ${guarded[-1]}/s"
done

c=$(median "${ceiling[@]}"); g=$(median "${guarded[@]}")
echo
echo "cluster of ${#PORTS[@]} masters, batch=$BATCH clients=$CLIENTS value_size=$VALUE_SIZE writes=$WRITES keyspace=$KEYSPACE rounds=$ROUNDS"
echo "median redis-benchmark --cluster -P $BATCH SET : $c writes/s"
echo "median version-guarded, one pipeline per node    : $g writes/s"
awk -v g="$g" -v c="$c" 'BEGIN { printf "ratio : %.1f%% of the ceiling\n", 100*g/c }'
