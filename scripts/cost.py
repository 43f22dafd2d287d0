#!/usr/bin/env python3
"""The monthly cost of keeping Klaviyo connections fresh, from a refresh benchmark's counts.

    COST_OUT=.local/cost scripts/bench-refresh.sh 2000 50 64
    scripts/cost.py .local/cost            # prints the tables of docs/COST.md

What each refresh does is measured (AWS calls per refreshed connection through a counting
proxy, the size of the item it writes and of its due-index entry, the job's CPU); how often it
happens follows from the policy; prices are the public list prices below. Everything the
benchmark cannot see (Klaviyo's latency in production, the host app's traffic) is a flag with
its default printed beside the tables.
"""

import argparse
import contextlib
import io
import json
import math
import sys

# Public list prices, us-east-1, USD, as published on the AWS pricing pages (on-demand
# DynamoDB since its 2024-11-01 reduction). Read 2026-11-27 from the pages as last known here:
# this machine cannot reach them, so check them before budgeting.
PRICES_DATE = "2026-11-27"
PRICE = {
    "dynamodb_write_unit": 0.625 / 1e6,  # per write request unit
    "dynamodb_read_unit": 0.125 / 1e6,  # per read request unit
    "dynamodb_storage_gb_month": 0.25,
    "kms_request": 0.03 / 1e4,
    "lambda_request": 0.20 / 1e6,
    "lambda_gb_second_arm": 0.0000133334,
    "scheduler_invocation": 1.00 / 1e6,  # EventBridge Scheduler (14M a month are free)
    "secrets_manager_call": 0.05 / 1e4,
    "logs_ingested_gb": 0.50,
}
AWS_KMS_CIPHERTEXT_BYTES = 184  # a 256-bit data key's CiphertextBlob from AWS KMS
SANDBOX_TOKEN_BYTES = 78  # the sandbox's access and refresh token together (sbx-at-… 39 + 39)
DAYS_PER_MONTH = 30
RUNS_PER_DAY = 24 * 60 // 5  # RefreshSchedule rate(5 minutes)
KB = 1024


def units(size_bytes, unit_bytes):
    return max(1, math.ceil(size_bytes / unit_bytes))


def per_refresh(calls, items, args):
    """What one refresh costs, by line, in USD, and its counts."""
    per = calls["calls_per_refresh"]
    count = lambda suffix: sum(v for k, v in per.items() if k.endswith(suffix))
    # The item as AWS stores it: the local KMS's data-key ciphertext replaced by AWS's.
    item = aws_item_bytes(items, args)
    leased = item + len("lease_owner") + 36 + len("lease_until") + 6
    # UpdateItem and PutItem are charged on the larger of the item before and after.
    wru_item = (count(".UpdateItem") + count(".PutItem")) * units(leased, KB)
    # A refresh moves due_at, an index key: the old entry is deleted and a new one written.
    wru_index = 2 * units(items["index_entry_bytes"], KB)
    # Query on the keys-only index: eventually consistent, half a unit per started 4 KB of
    # the entries returned (each refreshed connection's entry read once), per query.
    rru = 0.5 * items["index_entry_bytes"] / (4 * KB) + count(".Query") * 0.5
    kms = count("TrentService.Decrypt") + count("TrentService.GenerateDataKey")
    # The job's billed time per refresh: one worker's wait, shared by the concurrent workers.
    aws_calls = sum(per.values())
    wall_ms = args.klaviyo_ms + aws_calls * args.aws_ms + calls["job"]["job_cpu_ms_per_refresh"]
    gb_seconds = wall_ms / 1000 / args.concurrency * args.refresh_memory_mb / 1024
    # Both writes of a refresh (the lease and the result) are stream records: the events
    # function reads them in full batches (a refresh derives no event, so no PutEvents), and
    # Lambda logs its three platform lines per invocation.
    events_invocations = (count(".UpdateItem") + count(".PutItem")) / args.events_batch
    events_gb_seconds = events_invocations * args.events_ms / 1000 * 128 / 1024
    log_bytes = args.log_line_bytes + events_invocations * args.platform_log_bytes
    lines = {
        "DynamoDB writes (item)": wru_item * PRICE["dynamodb_write_unit"],
        "DynamoDB writes (due index)": wru_index * PRICE["dynamodb_write_unit"],
        "DynamoDB reads": rru * PRICE["dynamodb_read_unit"],
        "KMS": kms * PRICE["kms_request"],
        "Lambda (refresh job, GB-s)": gb_seconds * PRICE["lambda_gb_second_arm"],
        "Lambda (events function)": events_invocations * PRICE["lambda_request"]
        + events_gb_seconds * PRICE["lambda_gb_second_arm"],
        "CloudWatch Logs": log_bytes / 1e9 * PRICE["logs_ingested_gb"],
    }
    counts = {
        "write units (item)": wru_item,
        "write units (index)": wru_index,
        "read units": rru,
        "KMS calls": kms,
        "AWS calls": aws_calls,
        "item bytes (AWS)": item,
        "billed job ms": wall_ms / args.concurrency,
    }
    return lines, counts


def aws_item_bytes(items, args):
    """The measured item as AWS would store it: AWS's KMS ciphertext in place of the local
    one, and tokens of `--token-bytes` in place of the sandbox's."""
    return (items["item_bytes_max"] - items["local_kms_ciphertext_bytes"] + AWS_KMS_CIPHERTEXT_BYTES
            - SANDBOX_TOKEN_BYTES + args.token_bytes)


def per_use_record(items, args):
    """Recording a use (at most once an hour per connection): one UpdateItem of the item."""
    item = aws_item_bytes(items, args)
    return units(item + 30, KB) * PRICE["dynamodb_write_unit"]


def monthly(n, policy, refresh_lines, use_record, args):
    """Monthly USD by line for n OAuth connections."""
    eager_per_day = 24 * 60 / (args.token_minutes - 15)
    if policy == "eager":
        refreshes = n * eager_per_day
        uses = n * args.used * args.use_hours
    else:
        active = n * args.used
        idle = n - active
        # In use: as eager; idle: one keep-alive per interval; plus, per used connection, the
        # write that brings an idle one back (its use record with the index entry moved).
        refreshes = active * eager_per_day + idle * 24 / args.idle_hours
        uses = active * args.use_hours
    per_month = DAYS_PER_MONTH
    out = {line: cost * refreshes * per_month for line, cost in refresh_lines.items()}
    out["DynamoDB writes (use records)"] = uses * use_record * per_month
    if policy != "eager":
        out["DynamoDB writes (use records)"] += n * args.used * 2 * PRICE["dynamodb_write_unit"] * per_month
    fixed = RUNS_PER_DAY * per_month * (
        PRICE["lambda_request"] + PRICE["scheduler_invocation"] + PRICE["secrets_manager_call"]
    )
    out["Runs (schedule, requests, secret)"] = fixed
    out["DynamoDB storage"] = n * refresh_lines_item_gb(args) * PRICE["dynamodb_storage_gb_month"]
    return out, refreshes


def refresh_lines_item_gb(args):
    return args._item_bytes / 1e9


def handouts(n, args, items):
    """Host traffic, the same under both policies: per month. Each hand-out reads the item
    (strongly consistent) and logs a line; a container opens each connection's credentials
    with KMS once in its life (it keeps the data key, which also opens what refreshes seal)."""
    count = n * args.used * args.handouts * DAYS_PER_MONTH
    read = units(args._item_bytes, 4 * KB) * PRICE["dynamodb_read_unit"]
    lambda_cost = PRICE["lambda_request"] + args.token_ms / 1000 * 256 / 1024 * PRICE["lambda_gb_second_arm"]
    logs = (args.handout_log_bytes + args.platform_log_bytes) / 1e9 * PRICE["logs_ingested_gb"]
    opens_per_day = args.token_containers * 24 / args.token_container_hours
    opens = n * args.used * min(args.handouts, opens_per_day) * DAYS_PER_MONTH
    return count * (read + lambda_cost + logs) + opens * PRICE["kms_request"], count


def money(x):
    return f"${x:,.2f}" if x < 100 else f"${x:,.0f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", help="COST_OUT prefix of a refresh benchmark run")
    parser.add_argument("--check", metavar="DOC", help="fail unless DOC holds exactly what this prints")
    parser.add_argument("--connections", default="10000,100000,1000000")
    parser.add_argument("--used", type=float, default=0.10, help="share of connections used each day")
    parser.add_argument("--use-hours", type=float, default=8, help="hours a day a used connection has its use recorded")
    parser.add_argument("--handouts", type=float, default=100, help="credentials handed out per used connection a day")
    parser.add_argument("--idle-hours", type=float, default=24, help="REFRESH_IDLE_INTERVAL")
    parser.add_argument("--token-minutes", type=float, default=60, help="Klaviyo access token lifetime")
    parser.add_argument("--klaviyo-ms", type=float, default=200, help="Klaviyo token call latency in production")
    parser.add_argument("--aws-ms", type=float, default=8, help="AWS call latency from Lambda")
    parser.add_argument("--concurrency", type=int, default=16, help="REFRESH_CONCURRENCY")
    parser.add_argument("--refresh-memory-mb", type=int, default=256)
    parser.add_argument("--events-batch", type=float, default=10, help="stream records per events invocation")
    parser.add_argument("--events-ms", type=float, default=2, help="billed ms of an events invocation without events")
    parser.add_argument("--token-ms", type=float, default=6, help="billed ms of a warm token hand-out")
    parser.add_argument("--token-bytes", type=float, default=SANDBOX_TOKEN_BYTES, help="access and refresh token together, as Klaviyo issues them")
    parser.add_argument("--token-containers", type=float, default=2, help="warm token-function containers each used connection is handed out from")
    parser.add_argument("--token-container-hours", type=float, default=4, help="how long a token-function container lives")
    parser.add_argument("--handout-log-bytes", type=float, default=230, help="the credential_issued line, with CloudWatch's overhead")
    parser.add_argument("--log-line-bytes", type=float, default=210, help="the token_refreshed line, with CloudWatch's overhead")
    parser.add_argument("--platform-log-bytes", type=float, default=450, help="START, END and REPORT lines of an invocation")
    args = parser.parse_args()
    if args.check:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            report(args)
        if printed.getvalue().strip() not in open(args.check).read():
            sys.exit(f"{args.check} does not hold what scripts/cost.py {args.prefix} prints: regenerate it")
        print(f"{args.check} holds what scripts/cost.py prints from {args.prefix}")
    else:
        report(args)


def report(args):
    calls = json.load(open(f"{args.prefix}.calls.json"))
    items = json.load(open(f"{args.prefix}.items.json"))
    refresh_lines, counts = per_refresh(calls, items, args)
    args._item_bytes = counts["item bytes (AWS)"]
    use_record = per_use_record(items, args)
    job = calls["job"]

    print(f"Measured by the refresh benchmark ({job['refreshed']} connections refreshed, "
          f"Klaviyo latency {job['latency_ms']} ms, concurrency {job['concurrency']}):\n")
    print("| per refresh | measured |")
    print("|---|---|")
    for what, n in sorted(calls["calls_per_refresh"].items()):
        print(f"| {what} | {n:.4f} |")
    print(f"| job CPU | {job['job_cpu_ms_per_refresh']:.2f} ms |")
    print(f"| connection item (max; AWS's 184-byte KMS ciphertext in place of the local one) | {counts['item bytes (AWS)']} bytes |")
    print(f"| due-index entry | {items['index_entry_bytes']} bytes |")
    print(f"| write units: item (lease and result, each on the leased item) | {counts['write units (item)']:.0f} |")
    print(f"| write units: due index (due_at moves: delete + put) | {counts['write units (index)']:.0f} |")
    print(f"| KMS calls | {counts['KMS calls']:.2f} |")
    print()
    print(f"Prices: us-east-1 list prices as of {PRICES_DATE} (`scripts/cost.py`). Assumptions: "
          f"{args.used:.0%} of connections used each day, {args.use_hours:g} hours of use recorded a day each, "
          f"{args.handouts:g} hand-outs per used connection a day; tokens live {args.token_minutes:g} min "
          f"(eager: {24 * 60 / (args.token_minutes - 15):.0f} refreshes a day each); keep-alive every "
          f"{args.idle_hours:g} h; Klaviyo answers a refresh in {args.klaviyo_ms:g} ms, AWS calls "
          f"{args.aws_ms:g} ms, REFRESH_CONCURRENCY {args.concurrency}.\n")
    for n in [int(x) for x in args.connections.split(",")]:
        eager, eager_refreshes = monthly(n, "eager", refresh_lines, use_record, args)
        aware, aware_refreshes = monthly(n, "usage-aware", refresh_lines, use_record, args)
        traffic, count = handouts(n, args, items)
        print(f"#### {n:,} OAuth connections, per month\n")
        print("| | eager | usage-aware |")
        print("|---|---:|---:|")
        for line in eager:
            print(f"| {line} | {money(eager[line])} | {money(aware[line])} |")
        te, ta = sum(eager.values()), sum(aware.values())
        print(f"| **keeping connections fresh** | **{money(te)}** | **{money(ta)}** (1/{te / ta:.1f}) |")
        print(f"| host traffic: {count:,.0f} hand-outs (token function: a read and a log line each; KMS once per connection per container) | {money(traffic)} | {money(traffic)} |")
        print(f"| **in all** | **{money(te + traffic)}** | **{money(ta + traffic)}** (1/{(te + traffic) / (ta + traffic):.1f}) |")
        print(f"| Klaviyo token calls a day | {eager_refreshes:,.0f} | {aware_refreshes:,.0f} |")
        print()


if __name__ == "__main__":
    main()
