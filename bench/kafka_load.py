"""Load tools for bench/order_cacher.sh: produce orders, watch a service drain them.

  kafka_load.py produce --topic T --count N [--rate R] [--partitions P] [--log-append-time]
  kafka_load.py drain   --metrics URL --family F --count N        prints msgs_per_sec=<n>
  kafka_load.py p99     --metrics URL --family F                  prints p99 from a histogram
  kafka_load.py latency --topic T --count N [--skip K]           a bare consumer's p99 of
                                                                 (receive time - message timestamp)
"""
import argparse, json, random, time, urllib.request

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

BROKERS = "127.0.0.1:9092"


def order(i, version):
    body = {"order_id": str(i % 100000), "user_id": f"user_{i % 997}", "amount": 299.99,
            "status": "paid", "version": version, "timestamp": "2023-01-01 10:00:00",
            "items": [{"sku": f"SKU-{i}-A", "qty": 1}, {"sku": f"SKU-{i}-B", "qty": 2}]}
    text = json.dumps(body)
    return (text[:-1] + ', "note": "' + "x" * max(0, 300 - len(text) - 12) + '"}').encode()


def produce(args):
    admin = AdminClient({"bootstrap.servers": BROKERS})
    config = {"message.timestamp.type": "LogAppendTime"} if args.log_append_time else {}
    for f in admin.create_topics([NewTopic(args.topic, args.partitions, 1, config=config)]).values():
        try:
            f.result()
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    p = Producer({"bootstrap.servers": BROKERS, "linger.ms": 1 if args.rate else 20,
                  "enable.idempotence": True, "queue.buffering.max.messages": 1000000})
    if args.rate:
        # A steady rate from the first message: connect, get the idempotent producer id and
        # the topic's leaders first (one message to a side topic), or the first half second
        # of messages queues in the producer and reaches the broker as one burst.
        warmup = args.topic + ".warmup"
        for f in admin.create_topics([NewTopic(warmup, 1, 1)]).values():
            try:
                f.result()
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        p.produce(warmup, b"warm-up")
        p.flush(30)
        p.list_topics(args.topic, timeout=10)
    start = time.time()
    for i in range(args.count):
        if args.rate:
            delay = start + i / args.rate - time.time()
            if delay > 0:
                time.sleep(delay)
        while True:
            try:
                p.produce(args.topic, order(i, i + 1), partition=random.randrange(args.partitions))
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    p.flush(60)


def scrape(url, family):
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return [l for l in text.splitlines() if l.startswith(family)]


def total(url, family):
    return sum(float(l.rsplit(" ", 1)[1]) for l in scrape(url, family))


def drain(args):
    seen_at, seen = None, 0
    while True:
        try:
            n = total(args.metrics, args.family)
        except OSError:
            n = 0
        now = time.time()
        if seen_at is None and n > 0:
            seen_at, seen = now, n
        if n >= args.count:
            elapsed = now - seen_at
            print(f"msgs_per_sec={(n - seen) / elapsed:.0f}" if elapsed > 0 else "msgs_per_sec=0")
            return
        time.sleep(0.02)


def p99(args):
    buckets = []
    for l in scrape(args.metrics, args.family + "_bucket"):
        le = l.split('le="')[1].split('"')[0]
        buckets.append((float("inf") if le == "+Inf" else float(le), float(l.rsplit(" ", 1)[1])))
    count = buckets[-1][1]

    def quantile(q):
        prev_le, prev_c = 0.0, 0.0
        for le, c in buckets:
            if c >= q * count:
                # Linear inside the bucket, as Prometheus' histogram_quantile does.
                return 1000 * (prev_le + (le - prev_le) * (q * count - prev_c) / max(c - prev_c, 1))
            prev_le, prev_c = le, c

    print(f"p99_ms={quantile(0.99):.1f} p50_ms={quantile(0.5):.1f} samples={count:.0f}")


def latency(args):
    # The floor for event-to-cache latency: what a consumer that does nothing sees.
    c = Consumer({"bootstrap.servers": BROKERS, "group.id": f"latency-{time.time()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "fetch.wait.max.ms": 10})
    c.subscribe([args.topic])
    seen = []
    while len(seen) < args.count + args.skip:
        m = c.poll(0.1)  # returns as soon as one message is there; consume() would wait
        if m is not None and not m.error():
            seen.append((m.timestamp()[1], time.time() * 1000 - m.timestamp()[1]))
    c.close()
    # The first messages were there before the consumer started; they say nothing of latency.
    lags = sorted(lag for _, lag in sorted(seen)[args.skip:])
    print(f"p99_ms={lags[int(0.99 * len(lags))]:.1f} p50_ms={lags[len(lags) // 2]:.1f} samples={len(lags)}")


parser = argparse.ArgumentParser()
sub = parser.add_subparsers(dest="cmd", required=True)
p = sub.add_parser("produce"); p.add_argument("--topic"); p.add_argument("--count", type=int)
p.add_argument("--rate", type=float, default=0); p.add_argument("--partitions", type=int, default=3)
p.add_argument("--log-append-time", action="store_true")
d = sub.add_parser("drain"); d.add_argument("--metrics"); d.add_argument("--family"); d.add_argument("--count", type=int)
q = sub.add_parser("p99"); q.add_argument("--metrics"); q.add_argument("--family")
l = sub.add_parser("latency"); l.add_argument("--topic"); l.add_argument("--count", type=int)
l.add_argument("--skip", type=int, default=0)
args = parser.parse_args()
{"produce": produce, "drain": drain, "p99": p99, "latency": latency}[args.cmd](args)
