# Shared by the bench/*.sh scripts: source it after `cd` to the repository root.

DEPS_DIR=${DEPS_DIR:-$PWD/.deps}
export DEPS_DIR

# median <numbers...>: the middle value (the mean of the two middle ones, rounded down).
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }

# bench_python: creates the load generators' venv when missing and sets $py to its python.
bench_python() {
  local venv=$DEPS_DIR/bench-venv
  [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
  "$venv/bin/python" -c 'import confluent_kafka, kafka, pika, redis' 2>/dev/null \
    || "$venv/bin/pip" install -q confluent-kafka kafka-python pika redis
  py=$venv/bin/python
}

# launch_service <binary> <config file>: runs a service in the background on $PORT, logging to
# $tmp/service.log; stop_service (also run on exit) stops it. A bare name is the release build
# of that service; a path is run as it is.
service_pid=
launch_service() {
  local binary=$1
  [[ $binary == */* ]] || binary=target/release/$binary
  METRICS_ADDR=127.0.0.1:$PORT RUST_LOG=warn "$binary" --config "$2" 2>>"$tmp/service.log" &
  service_pid=$!
}

# start_order_cacher <binary> <topic> <group>: runs order-cacher on <topic> with the version
# guard on (batches of $BATCH). Its Redis database is flushed before each run: every run writes
# fresh keys, so it measures applied writes, not duplicates of the run before.
start_order_cacher() {
  cat >"$tmp/config.toml" <<TOML
[consumer]
group_id = "$3"
batch_size = $BATCH
[[topics]]
name = "$2"
key_template = "bench:order:{order_id}"
version_field = "version"
TOML
  redis-cli -n 13 flushdb >/dev/null
  REDIS_URL=redis://127.0.0.1:6379/13 launch_service "$1" "$tmp/config.toml"
}
stop_service() { [[ -n $service_pid ]] && kill "$service_pid" 2>/dev/null && wait "$service_pid" 2>/dev/null; service_pid=; }
trap stop_service EXIT

# peak_rss_mib: the running service's peak resident memory.
peak_rss_mib() { awk '/VmHWM/ {print int($2/1024)}' "/proc/$service_pid/status"; }

# start_private_redis <dir> <port> [redis-server args...]: a throwaway redis-server on 127.0.0.1
# (no persistence, keyspace events on, as scripts/deps runs it), logging to <dir>/<port>.log;
# returns once it answers.
start_private_redis() {
  local dir=$1 port=$2
  shift 2
  redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$dir" \
    --notify-keyspace-events KEA --daemonize yes --logfile "$dir/$port.log" "$@"
  for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "redis-server on port $port did not start" >&2
  return 1
}

# stop_private_redis <port...>
stop_private_redis() {
  for port in "$@"; do redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; done
}

# cpu_ticks <pid>: the user and system CPU time a process has used so far, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# The AMQP benchmarks' queues, through $tool (amqp_bench). With QUEUES=k a contender takes its
# load from k queues:
# queues <prefix>: the contender's queue names, <prefix>.1 to <prefix>.k
queues() { for i in $(seq 1 "$QUEUES"); do echo "$1.$i"; done; }
# list <prefix>: the same, comma-separated
list() { queues "$1" | paste -sd, -; }
# publish <prefix> <count>: fills each of the contender's queues with its share of <count>
publish() {
  local i=0 q
  for q in $(queues "$1"); do
    "$tool" publish --queue "$q" --count $(($2 / QUEUES + (i < $2 % QUEUES ? 1 : 0))) >/dev/null
    i=$((i + 1))
  done
}
# delete_amqp <name...>: deletes queues or exchanges, if they exist
delete_amqp() { "$tool" delete "$@" >/dev/null 2>&1 || true; }
