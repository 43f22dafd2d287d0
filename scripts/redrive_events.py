#!/usr/bin/env python3
"""Hands the stream batches in the events dead-letter queue to the events function again.

When the events function keeps failing a batch (EventBridge down for hours), Lambda's event
source mapping gives up on it and sends its place in the table's stream to the dead-letter
queue (EventsDeadLetterQueue on AWS): shard, first and last sequence number, never the
records. The stream keeps records for 24 hours, so within that time the batch can be read
again and delivered: this reads each message's records from the stream and invokes the
function with them, as the mapping would, then deletes the message. Events are published
with the same `eventId` as any earlier delivery, so consumers de-duplicate them.

    redrive_events.py --queue-url URL --function NAME [--dry-run]

Locally (`eval "$(scripts/local-stack.sh env)"`) the queue defaults to
EVENTS_DEAD_LETTER_QUEUE_URL, the function to `events`, and it is invoked through the local
Lambda endpoint (LOCAL_API_URL). On AWS, pass the stack's queue URL and the events function's
name; the caller needs sqs:ReceiveMessage/DeleteMessage on the queue, dynamodb:GetShardIterator
and GetRecords on the stream, and lambda:InvokeFunction. --dry-run prints what each message
holds and changes nothing. A batch older than the stream's retention cannot be read back: it is
reported (and its message kept) so someone can decide what the host app missed.
"""

import argparse
import json
import os
import sys

import boto3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stream_pump import as_lambda_json  # noqa: E402


def batch_records(streams, info):
    """The records of one given-up batch, read back from the stream ([] once trimmed)."""
    first, last = int(info["startSequenceNumber"]), int(info["endSequenceNumber"])
    try:
        iterator = streams.get_shard_iterator(
            StreamArn=info["streamArn"], ShardId=info["shardId"],
            ShardIteratorType="AT_SEQUENCE_NUMBER", SequenceNumber=str(first),
        )["ShardIterator"]
    except streams.exceptions.TrimmedDataAccessException:
        return []
    records = []
    while iterator:
        answer = streams.get_records(ShardIterator=iterator, Limit=1000)
        for record in answer.get("Records", []):
            if int(record["dynamodb"]["SequenceNumber"]) > last:
                return records
            record = as_lambda_json(record)
            record["eventSourceARN"] = info["streamArn"]
            records.append(record)
        if not answer.get("Records"):
            break
        iterator = answer.get("NextShardIterator")
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue-url", default=os.environ.get("EVENTS_DEAD_LETTER_QUEUE_URL"))
    parser.add_argument("--function", default="events")
    parser.add_argument("--lambda-endpoint-url", default=os.environ.get("LOCAL_API_URL"),
                        help="where to invoke the function (default: the local stack's; unset on AWS)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if not args.queue_url:
        sys.exit("--queue-url is required (or EVENTS_DEAD_LETTER_QUEUE_URL)")
    sqs = boto3.client("sqs")
    streams = boto3.client("dynamodbstreams")
    functions = boto3.client("lambda", endpoint_url=args.lambda_endpoint_url) if args.lambda_endpoint_url \
        else boto3.client("lambda")
    redriven = kept = 0
    looked_at = []  # a dry run's messages, made visible again at the end
    while True:
        messages = sqs.receive_message(QueueUrl=args.queue_url, MaxNumberOfMessages=10,
                                       WaitTimeSeconds=1, VisibilityTimeout=60).get("Messages", [])
        if not messages:
            break
        for message in messages:
            info = json.loads(message["Body"])["DDBStreamBatchInfo"]
            records = batch_records(streams, info)
            where = f"{info['shardId']} {info['startSequenceNumber']}..{info['endSequenceNumber']}"
            if not records:
                print(f"{where}: no longer in the stream (kept in the queue)", flush=True)
                kept += 1
                continue
            for record in records:
                keys = record["dynamodb"].get("Keys", {})
                print(f"{where}: {record['eventName']} {keys.get('pk', {}).get('S')} "
                      f"{keys.get('sk', {}).get('S')}", flush=True)
            if args.dry_run:
                looked_at.append(message["ReceiptHandle"])
                kept += 1
                continue
            answer = functions.invoke(FunctionName=args.function,
                                      Payload=json.dumps({"Records": records}).encode())
            if answer.get("FunctionError"):
                print(f"{where}: the function failed again: {answer['Payload'].read()[:300]!r}", flush=True)
                kept += 1
                continue
            sqs.delete_message(QueueUrl=args.queue_url, ReceiptHandle=message["ReceiptHandle"])
            redriven += 1
    for handle in looked_at:
        sqs.change_message_visibility(QueueUrl=args.queue_url, ReceiptHandle=handle, VisibilityTimeout=0)
    print(f"redriven {redriven}, kept {kept}", flush=True)
    sys.exit(1 if kept and not args.dry_run else 0)


if __name__ == "__main__":
    main()
