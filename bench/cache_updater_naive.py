"""The naive baseline, as the tutorials write it: pika, then one redis-py SET per message, then
an ack per message. Prints msgs_per_sec=<n> over `--count` messages, timed from the first.
`--queue` may name several queues, comma-separated: one consumer each on the one channel."""
import argparse, json, time

import pika
import redis

parser = argparse.ArgumentParser()
parser.add_argument("--queue"); parser.add_argument("--count", type=int)
parser.add_argument("--prefetch", type=int, default=1000)
args = parser.parse_args()

r = redis.Redis(host="127.0.0.1", port=6379, db=14)
connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
channel = connection.channel()
channel.basic_qos(prefetch_count=args.prefetch)
state = {"n": 0, "start": None}


def on_message(ch, method, properties, body):
    change = json.loads(body)
    r.set(change["key"], json.dumps(change["value"]))
    ch.basic_ack(delivery_tag=method.delivery_tag)
    state["n"] += 1
    if state["start"] is None:
        state["start"] = time.time()
    if state["n"] >= args.count:
        ch.stop_consuming()


for queue in args.queue.split(","):
    channel.basic_consume(queue=queue, on_message_callback=on_message)
channel.start_consuming()
print(f"msgs_per_sec={(state['n'] - 1) / (time.time() - state['start']):.0f}")
connection.close()
