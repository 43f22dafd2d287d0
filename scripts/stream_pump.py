#!/usr/bin/env python3
"""Plays Lambda's DynamoDB event source mapping for the local stack.

Reads the table's stream (TABLE_STREAM_ARN) from moto and hands each batch of changes to the
events function through the local Lambda invoke endpoint (`cargo lambda watch`), with the
settings of the template's AWS::Lambda::EventSourceMapping: its FilterCriteria, BatchSize,
MaximumRetryAttempts, BisectBatchOnFunctionError and StartingPosition. A batch the function
fails is tried again with backoff, then split in halves, and a single change that still fails
goes to the dead-letter queue (EVENTS_DEAD_LETTER_QUEUE_URL) with the stream positions Lambda
sends to a mapping's on-failure destination. Until the functions answer (they build first), it
waits without counting tries.

Like the mapping on AWS, it reads the stream and writes to the queue with the function's own
credentials (the profile named after its binary), so the template's statements for the stream
and the queue are what moto enforces, and the IAM audit sees them used.

    stream_pump.py --template template.yaml --api-url http://127.0.0.1:9000

Started by scripts/local-stack.sh up. `--max-retries` and `--starting-position` override the
template's, for the test that drives a batch to the dead-letter queue.
"""

import argparse
import base64
import datetime
import json
import os
import sys
import time
import urllib.error
import urllib.request

import boto3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provision import load_template  # noqa: E402

POLL_SECONDS = 0.25
# Records read per GetRecords call (its maximum): filtering happens before batching, as the
# event source mapping does it, so a stream full of other items' changes is read quickly.
READ_LIMIT = 1000
SHARDS_EVERY_SECONDS = 5.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 5.0


def log(message, **fields):
    print(json.dumps({"time": time.strftime("%H:%M:%S"), "message": message, **fields}), flush=True)


def stream_settings(template):
    """The binary name of the function the table's stream mapping invokes, and the mapping's
    properties."""
    resources = template["Resources"]
    for resource in resources.values():
        if resource["Type"] != "AWS::Lambda::EventSourceMapping":
            continue
        properties = resource["Properties"]
        function = resources[properties["FunctionName"]["Ref"]]
        return function["Metadata"]["BuildProperties"]["Binary"], properties
    sys.exit("template.yaml has no AWS::Lambda::EventSourceMapping")


def matches(pattern, value):
    """EventBridge-style filter patterns, as far as the template uses them: nested objects,
    lists of allowed values, and {"prefix": …}."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            key in value and matches(sub, value[key]) for key, sub in pattern.items()
        )
    if isinstance(pattern, list):
        for allowed in pattern:
            if isinstance(allowed, dict) and "prefix" in allowed:
                if isinstance(value, str) and value.startswith(allowed["prefix"]):
                    return True
            elif allowed == value:
                return True
        return False
    return pattern == value


def as_lambda_json(value):
    """A record from boto3 as Lambda delivers it: binary attributes base64, times in epoch
    seconds."""
    if isinstance(value, dict):
        return {key: as_lambda_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_lambda_json(item) for item in value]
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    return value


class Pump:
    def __init__(self, args):
        template = load_template(args.template)
        self.function, settings = stream_settings(template)
        self.filters = [json.loads(f["Pattern"]) for f in settings.get("FilterCriteria", {}).get("Filters", [])]
        self.batch_size = int(settings.get("BatchSize", 100))
        self.max_retries = args.max_retries if args.max_retries is not None else int(
            settings.get("MaximumRetryAttempts", -1))
        self.bisect = bool(settings.get("BisectBatchOnFunctionError", False))
        self.starting_position = args.starting_position or settings.get("StartingPosition", "LATEST")
        self.invoke_url = f"{args.api_url.rstrip('/')}/2015-03-31/functions/{self.function}/invocations"
        self.stream_arn = os.environ["TABLE_STREAM_ARN"]
        self.dead_letters = os.environ.get("EVENTS_DEAD_LETTER_QUEUE_URL")
        role = boto3.session.Session(profile_name=self.function)
        self.streams = role.client("dynamodbstreams")
        self.sqs = role.client("sqs")
        self.positions = {}  # shard -> the last sequence number handed on
        self.known_shards = []
        self.shards_read_at = 0.0

    def run(self):
        if self.starting_position == "LATEST":
            # Only what is written from now on: start each shard after its last record.
            for shard in self.shards():
                while self.pump_shard(shard, deliver=False):
                    pass
        log("pumping the table's stream", stream=self.stream_arn, function=self.function,
            batch_size=self.batch_size, max_retries=self.max_retries, bisect=self.bisect,
            starting_position=self.starting_position)
        while True:
            busy = False
            for shard in self.shards():
                busy |= self.pump_shard(shard)
            if not busy:
                time.sleep(POLL_SECONDS)

    def shards(self):
        if time.monotonic() - self.shards_read_at > SHARDS_EVERY_SECONDS:
            description = self.streams.describe_stream(StreamArn=self.stream_arn)["StreamDescription"]
            self.known_shards = [shard["ShardId"] for shard in description.get("Shards", [])]
            self.shards_read_at = time.monotonic()
        return self.known_shards

    def pump_shard(self, shard, deliver=True):
        # A fresh iterator from the last position each time rather than the previous answer's
        # NextShardIterator: moto's iterators hold the shard object, which a failed
        # transaction replaces (it restores a copy of the table), and would then read nothing.
        position = self.positions.get(shard)
        where = (
            {"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": position}
            if position
            else {"ShardIteratorType": "TRIM_HORIZON"}
        )
        iterator = self.streams.get_shard_iterator(StreamArn=self.stream_arn, ShardId=shard, **where)["ShardIterator"]
        answer = self.streams.get_records(ShardIterator=iterator, Limit=READ_LIMIT)
        records = [as_lambda_json(r) for r in answer.get("Records", [])]
        if records:
            self.positions[shard] = records[-1]["dynamodb"]["SequenceNumber"]
        if not deliver:
            return bool(records)
        for record in records:
            record["eventSourceARN"] = self.stream_arn
        wanted = [r for r in records if not self.filters or any(matches(p, r) for p in self.filters)]
        if wanted:
            log("read", shard=shard, records=len(records), connections=len(wanted))
        for start in range(0, len(wanted), self.batch_size):
            self.deliver(shard, wanted[start:start + self.batch_size])
        return bool(records)

    def deliver(self, shard, batch):
        """At least once: retried, then split, then set aside; never dropped silently. A
        `MaximumRetryAttempts` of -1 (the default) retries until the function takes it."""
        backoff = FIRST_BACKOFF
        attempt = 0
        while True:
            attempt += 1
            error = self.invoke(batch)
            if error is None:
                return
            if 0 <= self.max_retries < attempt:
                break
            log("the events function failed a batch; retrying", attempt=attempt, size=len(batch), error=error)
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
        if self.bisect and len(batch) > 1:
            middle = len(batch) // 2
            self.deliver(shard, batch[:middle])
            self.deliver(shard, batch[middle:])
            return
        log("giving up on a batch: sent to the dead-letter queue", size=len(batch), error=error)
        if self.dead_letters:
            # What Lambda sends to a stream mapping's on-failure destination: where the batch
            # is in the stream (read it again from there to redrive it), never the records.
            self.sqs.send_message(QueueUrl=self.dead_letters, MessageBody=json.dumps({
                "requestContext": {"condition": "RetryAttemptsExhausted", "approximateInvokeCount": attempt},
                "responseContext": {"functionError": "Unhandled"},
                "version": "1.0",
                "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "DDBStreamBatchInfo": {
                    "shardId": shard,
                    "startSequenceNumber": batch[0]["dynamodb"].get("SequenceNumber"),
                    "endSequenceNumber": batch[-1]["dynamodb"].get("SequenceNumber"),
                    "batchSize": len(batch),
                    "streamArn": self.stream_arn,
                },
                "error": error,
            }))

    def invoke(self, batch):
        """None when the function handled the batch, else why not. Waits (without counting)
        while the functions are not being served yet."""
        body = json.dumps({"Records": batch}).encode()
        while True:
            request = urllib.request.Request(self.invoke_url, data=body, method="POST",
                                             headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = response.read().decode(errors="replace")
                    if response.headers.get("x-amz-function-error"):
                        return answer[:300]
                    try:
                        parsed = json.loads(answer)
                    except ValueError:
                        parsed = None
                    if isinstance(parsed, dict) and "errorType" in parsed:
                        return answer[:300]
                    return None
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code == 404:  # the function is not being served yet
                    log("the events function is not served yet; waiting", answer=detail)
                    time.sleep(1)
                    continue
                return f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                log("the functions do not answer yet; waiting", error=str(e))
                time.sleep(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", required=True)
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--max-retries", type=int, help="instead of the template's MaximumRetryAttempts")
    parser.add_argument("--starting-position", choices=["TRIM_HORIZON", "LATEST"],
                        help="instead of the template's StartingPosition")
    args = parser.parse_args()
    try:
        Pump(args).run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
