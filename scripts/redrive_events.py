#!/usr/bin/env python3
"""Hands the stream batches in the events dead-letter queue to the events function again.

When the events function keeps failing a batch (EventBridge down for hours), Lambda's event
source mapping gives up on it and sends its place in the table's stream to the dead-letter
queue (EventsDeadLetterQueue on AWS): shard, first and last sequence number, never the
records. The stream keeps records for 24 hours, so within that time the batch can be read
again and delivered: this reads each message's records from the stream and invokes the
function with them, as the mapping would (its filter, ten records per invoke), then deletes the
message; a message whose batch cannot be read back whole is kept. Events are published
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
from provision import load_template  # noqa: E402
from stream_pump import as_lambda_json, matches, stream_settings  # noqa: E402


# Empty pages of a shard followed before giving up on reaching a batch's last record.
EMPTY_PAGES = 20
# Records per invoke: the mapping's batch size.
BATCH_SIZE = 10


class NotInStream(Exception):
    """The batch can no longer be read back whole (trimmed, or the stream is gone)."""


def batch_records(streams, info, wanted):
    """The records of one given-up batch read back from the stream, filtered as the mapping
    filters them; NotInStream unless every record up to the last one was reached."""
    first, last = int(info["startSequenceNumber"]), int(info["endSequenceNumber"])
    try:
        iterator = streams.get_shard_iterator(
            StreamArn=info["streamArn"], ShardId=info["shardId"],
            ShardIteratorType="AT_SEQUENCE_NUMBER", SequenceNumber=str(first),
        )["ShardIterator"]
        records, empty = [], 0
        while iterator and empty < EMPTY_PAGES:
            answer = streams.get_records(ShardIterator=iterator, Limit=1000)
            page = answer.get("Records", [])
            empty = 0 if page else empty + 1
            for record in page:
                if int(record["dynamodb"]["SequenceNumber"]) > last:
                    return records
                record = as_lambda_json(record)
                record["eventSourceARN"] = info["streamArn"]
                if wanted(record):
                    records.append(record)
                if int(record["dynamodb"]["SequenceNumber"]) == last:
                    return records
            iterator = answer.get("NextShardIterator")
    except (streams.exceptions.TrimmedDataAccessException,
            streams.exceptions.ResourceNotFoundException) as error:
        raise NotInStream(str(error)) from error
    raise NotInStream("the batch's last record was not reached")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue-url", default=os.environ.get("EVENTS_DEAD_LETTER_QUEUE_URL"))
    parser.add_argument("--function", default="events")
    parser.add_argument("--lambda-endpoint-url", default=os.environ.get("LOCAL_API_URL"),
                        help="where to invoke the function (default: the local stack's; unset on AWS)")
    parser.add_argument("--template", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "template.yaml"),
                        help="the template whose stream mapping's filter applies")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if not args.queue_url:
        sys.exit("--queue-url is required (or EVENTS_DEAD_LETTER_QUEUE_URL)")
    sqs = boto3.client("sqs")
    streams = boto3.client("dynamodbstreams")
    functions = boto3.client("lambda", endpoint_url=args.lambda_endpoint_url) if args.lambda_endpoint_url \
        else boto3.client("lambda")
    filters = [json.loads(f["Pattern"]) for f in
               stream_settings(load_template(args.template))[1].get("FilterCriteria", {}).get("Filters", [])]
    wanted = lambda record: not filters or any(matches(p, record) for p in filters)  # noqa: E731
    redriven = kept = 0
    seen = set()  # messages already handled this run (kept ones come back once visible)
    looked_at = []  # a dry run's messages, made visible again at the end
    while True:
        messages = [m for m in sqs.receive_message(
            QueueUrl=args.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
            VisibilityTimeout=900).get("Messages", []) if m["MessageId"] not in seen]
        if not messages:
            break
        for message in messages:
            seen.add(message["MessageId"])
            info = json.loads(message["Body"])["DDBStreamBatchInfo"]
            where = f"{info['shardId']} {info['startSequenceNumber']}..{info['endSequenceNumber']}"
            try:
                records = batch_records(streams, info, wanted)
            except NotInStream as why:
                print(f"{where}: cannot be read back ({why}); kept in the queue", flush=True)
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
            failed = None
            for start in range(0, len(records), BATCH_SIZE):
                answer = functions.invoke(FunctionName=args.function,
                                          Payload=json.dumps({"Records": records[start:start + BATCH_SIZE]}).encode())
                if answer.get("FunctionError"):
                    failed = answer["Payload"].read()[:300]
                    break
            if failed is not None:
                print(f"{where}: the function failed again: {failed!r}; kept in the queue", flush=True)
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
