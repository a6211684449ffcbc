"""The naive baseline, as the tutorials write it: kafka-python, then one redis-py SET per
message. Prints msgs_per_sec=<n> over `--count` messages, timed from the first message."""
import argparse, json, time

import redis
from kafka import KafkaConsumer

parser = argparse.ArgumentParser()
parser.add_argument("--topic"); parser.add_argument("--count", type=int); parser.add_argument("--group")
args = parser.parse_args()

consumer = KafkaConsumer(args.topic, bootstrap_servers="127.0.0.1:9092", group_id=args.group,
                         auto_offset_reset="earliest",
                         value_deserializer=lambda v: json.loads(v.decode("utf-8")))
r = redis.Redis(host="127.0.0.1", port=6379, db=14)
n, start = 0, None
for message in consumer:
    order = message.value
    r.set(f"order:{order['order_id']}", json.dumps(order))
    n += 1
    if start is None:
        start = time.time()
    if n >= args.count:
        break
print(f"msgs_per_sec={(n - 1) / (time.time() - start):.0f}")
