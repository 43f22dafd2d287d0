#!/usr/bin/env python3
"""moto_server, with requests authorized the way AWS authorizes them.

moto (5.1.22) can check IAM (INITIAL_NO_AUTH_ACTION_COUNT), but for DynamoDB (and its streams),
KMS, Secrets Manager, EventBridge and SQS it checks every action against the resource `*`, so a statement scoped to a table or key
ARN never matches; it checks `dynamodb:TransactWriteItems`, an action AWS does not have (AWS
checks each item's PutItem, UpdateItem, DeleteItem or ConditionCheckItem); and it passes
conditions it has no values for. This wrapper replaces only the authorization step: for each
request it works out what AWS would check (action, resource ARN, and for KMS the
`kms:EncryptionContext:*` keys of the request) and evaluates the caller's IAM policies itself:
Allow and Deny, wildcards in actions and resources, and StringEquals conditions. A policy using
anything else fails loudly instead of being half-evaluated.

It also serializes DynamoDB item writes (see below: moto's failed transactions would
otherwise drop concurrent writes). Signature checking, access keys and users stay moto's. Usage is moto_server's:
    moto_iam_server.py -H 127.0.0.1 -p PORT
With MOTO_IAM_AUDIT_LOG set, every decision is appended there as a JSON line (user, action,
resource, allowed), so `scripts/iam_audit.py` can tell which granted actions were never used.
"""

import fnmatch
import json
import os
import sys
import threading

from moto import server
from moto.core.exceptions import JsonRESTError
from moto.iam import access_control

SUPPORTED_CONDITIONS = {"StringEquals"}


class UnsupportedPolicy(Exception):
    pass


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _body(request):
    try:
        return json.loads(request._body or b"{}")
    except (ValueError, TypeError):
        return {}


def _dynamodb_table(request, table, index=None):
    arn = f"arn:aws:dynamodb:{request._region}:{request.account_id}:table/{table}"
    return f"{arn}/index/{index}" if index else arn


def _kms_key(request, key_id):
    from moto.kms.models import kms_backends

    backend = kms_backends[request.account_id][request._region]
    try:
        return backend.describe_key(key_id).arn
    except Exception:  # an unknown key: let the service answer NotFound
        return key_id


def _secret(request, secret_id):
    from moto.secretsmanager.models import secretsmanager_backends

    secrets = secretsmanager_backends[request.account_id][request._region].secrets
    secret = secrets.get(secret_id)
    return secret.arn if secret else secret_id


def _event_bus(request, bus):
    if bus.startswith("arn:"):
        return bus
    return f"arn:aws:events:{request._region}:{request.account_id}:event-bus/{bus}"


TRANSACT_ITEM_ACTIONS = {
    "Put": "PutItem",
    "Update": "UpdateItem",
    "Delete": "DeleteItem",
    "ConditionCheck": "ConditionCheckItem",
    "Get": "GetItem",
}


def checks(request):
    """What AWS authorizes for this request: (action, resource, condition context) triples."""
    service, _, operation = request._action.partition(":")
    body = _body(request)
    if service == "dynamodb":
        # DynamoDB Streams (signed as dynamodb): on the stream; an iterator names its stream
        # (moto's iterators start with the stream's ARN). ListStreams has no resource type in
        # AWS: it falls through to `*`.
        if "StreamArn" in body:
            return [(request._action, body["StreamArn"], {})]
        if "ShardIterator" in body:
            return [(request._action, body["ShardIterator"].split("|")[0], {})]
        if operation == "ListStreams":
            return [(request._action, "*", {})]
        if operation in ("TransactWriteItems", "TransactGetItems"):
            result = []
            for item in body.get("TransactItems", []):
                for kind, spec in item.items():
                    action = TRANSACT_ITEM_ACTIONS[kind]
                    result.append((f"dynamodb:{action}", _dynamodb_table(request, spec["TableName"]), {}))
            return result
        if operation in ("BatchGetItem", "BatchWriteItem"):
            return [
                (request._action, _dynamodb_table(request, table), {})
                for table in body.get("RequestItems", {})
            ]
        if "TableName" in body:
            return [(request._action, _dynamodb_table(request, body["TableName"], body.get("IndexName")), {})]
    if service == "kms" and "KeyId" in body:
        context = {
            f"kms:EncryptionContext:{key}": value
            for key, value in (body.get("EncryptionContext") or {}).items()
        }
        return [(request._action, _kms_key(request, body["KeyId"]), context)]
    if service == "secretsmanager" and "SecretId" in body:
        return [(request._action, _secret(request, body["SecretId"]), {})]
    if service == "sqs" and "QueueUrl" in body:
        name = body["QueueUrl"].rstrip("/").rsplit("/", 1)[-1]
        return [(request._action, f"arn:aws:sqs:{request._region}:{request.account_id}:{name}", {})]
    if service == "events" and operation == "PutEvents":
        # Authorized on each event bus the entries name (the default bus when none).
        buses = {entry.get("EventBusName") or "default" for entry in body.get("Entries", [])}
        return [(request._action, _event_bus(request, bus), {}) for bus in sorted(buses)]
    return [(request._action, "*", {})]


def _matches(patterns, value, case_sensitive):
    for pattern in _as_list(patterns):
        if case_sensitive:
            if fnmatch.fnmatchcase(value, pattern):
                return True
        elif fnmatch.fnmatchcase(value.lower(), pattern.lower()):
            return True
    return False


def _conditions_hold(conditions, context):
    for operator, tests in (conditions or {}).items():
        if operator not in SUPPORTED_CONDITIONS:
            raise UnsupportedPolicy(f"condition operator {operator} is not evaluated locally")
        for key, expected in tests.items():
            if key not in context or context[key] not in _as_list(expected):
                return False
    return True


def permitted(documents, action, resource, context):
    """IAM's evaluation for identity policies: an explicit Deny wins, else any Allow."""
    allowed = False
    for document in documents:
        for statement in _as_list(document.get("Statement", [])):
            if "NotAction" in statement or "NotResource" in statement:
                raise UnsupportedPolicy("NotAction/NotResource are not evaluated locally")
            if not _matches(statement.get("Action", []), action, case_sensitive=False):
                continue
            if not _matches(statement.get("Resource", []), resource, case_sensitive=True):
                continue
            if not _conditions_hold(statement.get("Condition"), context):
                continue
            if statement.get("Effect") == "Deny":
                return False
            allowed = True
    return allowed


class AccessDeniedException(JsonRESTError):
    """The refusal as DynamoDB, KMS and Secrets Manager send it (moto's is an XML error the
    JSON protocols' clients cannot classify)."""

    code = 400

    def __init__(self, user_arn, action, resource):
        super().__init__(
            "AccessDeniedException",
            f"User: {user_arn} is not authorized to perform: {action} on resource: {resource} "
            f"because no identity-based policy allows the {action} action",
        )


AUDIT_LOG = os.environ.get("MOTO_IAM_AUDIT_LOG")
_audit_lock = threading.Lock()


def _audit(user, action, resource, allowed):
    if not AUDIT_LOG:
        return
    line = json.dumps({"user": user, "action": action, "resource": resource, "allowed": allowed})
    with _audit_lock, open(AUDIT_LOG, "a") as f:
        f.write(line + "\n")


def check_action_permitted(self, resource):
    documents = [
        access_control.IAMPolicy(policy)._policy_json
        for policy in self._access_key.collect_policies()
    ]
    for action, arn, context in checks(self):
        allowed = permitted(documents, action, arn, context)
        _audit(self._access_key.arn, action, arn, allowed)
        if not allowed:
            print(f"AccessDenied: {self._access_key.arn} {action} on {arn}", file=sys.stderr, flush=True)
            raise AccessDeniedException(self._access_key.arn, action, arn)


access_control.IAMRequestBase.check_action_permitted = check_action_permitted


# moto applies a TransactWriteItems item by item and, when one fails its condition, puts back
# a deep copy of each whole table taken before it started: slow on a large table, and a write
# another request made in between is lost with it (and its stream record, and any stream
# iterator still reads the replaced table's stream), which DynamoDB never does. Here item
# writes take turns, and a transaction saves only the items it names and undoes only those
# (and the stream records it added) when it fails.
import copy  # noqa: E402

from moto.dynamodb.models import DynamoDBBackend  # noqa: E402
from moto.dynamodb.models.dynamo_type import DynamoType  # noqa: E402
from moto.dynamodb.models.table import Table  # noqa: E402
from moto.dynamodbstreams.models import DynamoDBStreamsBackend  # noqa: E402

_writes = threading.RLock()


def _one_at_a_time(method):
    def write(*args, **kwargs):
        with _writes:
            return method(*args, **kwargs)

    return write


for _name in ("put_item", "update_item", "delete_item"):
    setattr(DynamoDBBackend, _name, _one_at_a_time(getattr(DynamoDBBackend, _name)))
# Readers of the stream see no record a failing transaction is about to take back.
DynamoDBStreamsBackend.get_records = _one_at_a_time(DynamoDBStreamsBackend.get_records)

_moto_transact_write_items = DynamoDBBackend.transact_write_items


def _key_of(table, op_type, op):
    attributes = op["Item"] if op_type == "Put" else op["Key"]
    hash_value = DynamoType(attributes[table.hash_key_attr])
    range_value = DynamoType(attributes[table.range_key_attr]) if table.range_key_attr else None
    return hash_value, range_value


def _restore(table, hash_value, range_value, before):
    if range_value is not None:
        if before is None:
            table.items[hash_value].pop(range_value, None)
        else:
            table.items[hash_value][range_value] = before
    elif before is None:
        table.items.pop(hash_value, None)
    else:
        table.items[hash_value] = before


def transact_write_items(self, transact_items):
    with _writes:
        saved, streams = [], {}
        for entry in transact_items:
            op_type, op = next(iter(entry.items()))
            table = self.tables.get(op.get("TableName"))
            if table is None:
                continue
            try:
                hash_value, range_value = _key_of(table, op_type, op)
            except (KeyError, TypeError):
                continue  # malformed: moto's own validation answers it
            saved.append((table, hash_value, range_value, copy.deepcopy(table.get_item(hash_value, range_value))))
            if table.stream_shard is not None:
                streams.setdefault(id(table), (table, len(table.stream_shard.items)))
        # moto's whole-table copy becomes the table itself, so its restore changes nothing.
        Table.__deepcopy__ = lambda table, memo: table
        try:
            return _moto_transact_write_items(self, transact_items)
        except Exception:
            for table, hash_value, range_value, before in reversed(saved):
                _restore(table, hash_value, range_value, before)
            for table, length in streams.values():
                del table.stream_shard.items[length:]
            raise
        finally:
            del Table.__deepcopy__


DynamoDBBackend.transact_write_items = transact_write_items

if __name__ == "__main__":
    sys.exit(server.main(sys.argv[1:]))
