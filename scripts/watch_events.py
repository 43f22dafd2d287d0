#!/usr/bin/env python3
"""Prints the connection lifecycle events of the local stack as they arrive.

The local bus (EVENT_BUS_NAME) delivers every event to a queue (EVENT_QUEUE_URL), as a host
app's rule would deliver them to its own target; this reads that queue, prints each event
(type, then its detail) and deletes it. With the stack's settings in the environment:

    eval "$(scripts/local-stack.sh env)"; .venv/bin/python scripts/watch_events.py

With --user, it subscribes a queue of its own to that user's events (a rule on the bus, as a
host app would), prints "subscribed" once it listens, and with --expect waits for each named
event type in turn, printing each event as one JSON line; it exits 0 when all came, 1 after
--timeout seconds (the browser journey uses this), and removes its rule and queue either way:

    .venv/bin/python scripts/watch_events.py --user alice \\
        --expect "Connection Needs Reauth" --expect "Connection Reauthorized"
"""

import argparse
import json
import os
import sys
import time
import uuid

import boto3


def follow(sqs, queue):
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


def expect(sqs, queue, wanted, timeout):
    """Prints each wanted event (one JSON line) as it comes; True when all came in time."""
    deadline = time.monotonic() + timeout
    while wanted and time.monotonic() < deadline:
        answer = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in answer.get("Messages", []):
            event = json.loads(message["Body"])
            if event.get("detail-type") in wanted:
                wanted.remove(event["detail-type"])
                print(json.dumps(event, sort_keys=True), flush=True)
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
    if wanted:
        print(f"not received within {timeout} s: {', '.join(wanted)}", file=sys.stderr, flush=True)
    return not wanted


def subscribed(sqs, user, wanted, timeout):
    bus = os.environ.get("EVENT_BUS_NAME")
    if not bus:
        sys.exit('EVENT_BUS_NAME is not set: eval "$(scripts/local-stack.sh env)" first')
    events = boto3.client("events")
    name = f"watch-{uuid.uuid4().hex[:16]}"
    queue = sqs.create_queue(QueueName=name)["QueueUrl"]
    try:
        arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        pattern = {"source": ["klaviyo-connect"], "detail": {"userId": [user]}}
        rule = events.put_rule(Name=name, EventBusName=bus, EventPattern=json.dumps(pattern))["RuleArn"]
        try:
            # What AWS needs before the rule may send to the queue (moto does not check it).
            policy = {"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": {"Service": "events.amazonaws.com"},
                "Action": "sqs:SendMessage", "Resource": arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": rule}}}]}
            sqs.set_queue_attributes(QueueUrl=queue, Attributes={"Policy": json.dumps(policy)})
            events.put_targets(Rule=name, EventBusName=bus, Targets=[{"Id": "queue", "Arn": arn}])
            print("subscribed", file=sys.stderr, flush=True)
            if wanted:
                return expect(sqs, queue, list(wanted), timeout)
            follow(sqs, queue)
            return True
        finally:
            tidy(lambda: events.remove_targets(Rule=name, EventBusName=bus, Ids=["queue"]))
            tidy(lambda: events.delete_rule(Name=name, EventBusName=bus))
    finally:
        tidy(lambda: sqs.delete_queue(QueueUrl=queue))


def tidy(step):
    """A clean-up step that must not hide the error that led to it."""
    try:
        step()
    except Exception as error:  # noqa: BLE001 - reported, and the next step still runs
        print(f"clean-up: {error}", file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--user", help="subscribe a queue of its own to this user's events")
    parser.add_argument("--expect", action="append", default=[], metavar="TYPE",
                        help="with --user: wait for an event of this detail-type (repeatable)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for --expect")
    args = parser.parse_args()
    sqs = boto3.client("sqs")
    if args.user:
        sys.exit(0 if subscribed(sqs, args.user, args.expect, args.timeout) else 1)
    if args.expect:
        sys.exit("--expect needs --user")
    queue = os.environ.get("EVENT_QUEUE_URL")
    if not queue:
        sys.exit('EVENT_QUEUE_URL is not set: eval "$(scripts/local-stack.sh env)" first')
    follow(sqs, queue)


if __name__ == "__main__":
    main()
