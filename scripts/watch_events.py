#!/usr/bin/env python3
"""Prints the connection lifecycle events of the local stack as they arrive.

The local bus (EVENT_BUS_NAME) delivers every event to a queue (EVENT_QUEUE_URL), as a host
app's rule would deliver them to its own target; this reads that queue, prints each event
(type, then its detail) and deletes it. With the stack's settings in the environment:

    eval "$(scripts/local-stack.sh env)"; .venv/bin/python scripts/watch_events.py
"""

import json
import os
import sys

import boto3


def main():
    queue = os.environ.get("EVENT_QUEUE_URL")
    if not queue:
        sys.exit('EVENT_QUEUE_URL is not set: eval "$(scripts/local-stack.sh env)" first')
    sqs = boto3.client("sqs")
    print(f"Waiting for connection events on {queue} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        while True:
            answer = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=5)
            for message in answer.get("Messages", []):
                event = json.loads(message["Body"])
                print(f"{event.get('time', '')}  {event.get('detail-type')}", flush=True)
                print("  " + json.dumps(event.get("detail"), sort_keys=True), flush=True)
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
