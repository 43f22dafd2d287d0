#!/usr/bin/env python3
"""Provisions the local stack in a running moto server and prints its environment.

Everything comes from template.yaml, so the local stack cannot drift from the deployed one:

- the DynamoDB table (keys, indexes, TTL) from the ConnectionsTable resource;
- one IAM user per function whose only policy is that function's `Policies` statements in the
  template, with `!GetAtt`, `!Ref` and `!Sub` resolved to the local table, key and secrets;
  their access keys go to a shared credentials file, one profile per function (named after the
  function's binary), which `cargo lambda watch` selects per function through
  `[workspace.metadata.lambda.bin.<name>.env]` in Cargo.toml;
- the KMS key and the two secrets get fresh random local values;
- the table's stream (StreamSpecification), the connection events bus, and a local queue
  subscribed to every event on it (EVENT_QUEUE_URL: where `make dev` shows the events), plus
  the queue stream batches go to when the events function keeps failing (as
  EventsDeadLetterQueue on AWS). scripts/stream_pump.py plays Lambda's event source mapping.

moto runs with INITIAL_NO_AUTH_ACTION_COUNT=3: the first three calls here create the admin user
provisioning (and the tests) use; every later call of anyone is checked against IAM policies
(scripts/moto_iam_server.py). The `default` profile is a user with no permissions, so a function
that was not given its profile fails loudly instead of running with someone else's rights.

Output: `export NAME=value` lines on stdout.
"""

import argparse
import json
import os
import re
import secrets
import shlex
import sys

import boto3
from botocore.exceptions import ClientError
import yaml

TABLE_NAME = "klaviyo-connect-local"
KEY_ALIAS = "alias/klaviyo-connect-local"
CLIENT_SECRET_NAME = "klaviyo-connect/local/klaviyo-client-secret"
JWT_SECRET_NAME = "klaviyo-connect/local/jwt-secret"
EVENT_BUS_NAME = "klaviyo-connect-local-connections"
EVENT_QUEUE_NAME = "klaviyo-connect-local-events"
EVENTS_DEAD_LETTER_QUEUE_NAME = "klaviyo-connect-local-events-dead-letters"
REGION = "us-east-1"
ADMIN_USER = "klaviyo-connect-admin"
NOBODY_USER = "klaviyo-connect-nobody"
SECRETS_ONLY_USER = "klaviyo-connect-secrets-only"
# The calls that create the admin user before IAM is enforced (INITIAL_NO_AUTH_ACTION_COUNT).
UNAUTHENTICATED_CALLS = 3


class CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation short-form tags (!Ref, !Sub, ...) as plain {"Fn::X": value}."""


def _cfn_tag(loader, tag_suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    name = "Ref" if tag_suffix == "Ref" else f"Fn::{tag_suffix}"
    return {name: value}


CfnLoader.add_multi_constructor("!", _cfn_tag)


def load_template(path):
    with open(path) as f:
        return yaml.load(f, Loader=CfnLoader)


def table_definition(template):
    tables = [r for r in template["Resources"].values() if r["Type"] == "AWS::DynamoDB::Table"]
    if len(tables) != 1:
        sys.exit(f"expected exactly one AWS::DynamoDB::Table in the template, found {len(tables)}")
    return tables[0]["Properties"]


class Resolver:
    """Resolves the intrinsic functions IAM statements use, against the local resources."""

    def __init__(self, refs, attributes):
        self.refs = refs  # logical id -> value of !Ref
        self.attributes = attributes  # "Logical.Attr" -> value of !GetAtt
        self.refs.update({"AWS::Partition": "aws", "AWS::Region": REGION, "AWS::AccountId": "123456789012"})

    def __call__(self, value):
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            if set(value) == {"Ref"}:
                return self.lookup(self.refs, value["Ref"])
            if set(value) == {"Fn::GetAtt"}:
                name = value["Fn::GetAtt"]
                return self.lookup(self.attributes, name if isinstance(name, str) else ".".join(name))
            if set(value) == {"Fn::Sub"}:
                return re.sub(r"\$\{([^}]+)\}", lambda m: self.substitute(m.group(1)), value["Fn::Sub"])
            return {k: self(v) for k, v in value.items()}
        return value

    def substitute(self, name):
        return self.lookup(self.attributes, name) if "." in name else self.lookup(self.refs, name)

    @staticmethod
    def lookup(table, name):
        if name not in table:
            sys.exit(f"provision.py cannot resolve {name!r} in an IAM statement of template.yaml")
        return table[name]


def function_policies(template, resolve):
    """{binary name: policy document} for every AWS::Serverless::Function in the template."""
    policies = {}
    for logical_id, resource in template["Resources"].items():
        if resource["Type"] != "AWS::Serverless::Function":
            continue
        binary = resource["Metadata"]["BuildProperties"]["Binary"]
        statements = []
        for policy in resource["Properties"].get("Policies", []):
            if not isinstance(policy, dict) or set(policy) != {"Statement"}:
                sys.exit(f"{logical_id}: only inline `- Statement:` policies can be enforced locally")
            statements.extend(resolve(policy["Statement"]))
        policies[binary] = {"Version": "2012-10-17", "Statement": statements}
    return policies


def create_user(iam, name, policy):
    iam.create_user(UserName=name)
    if policy is not None:
        iam.put_user_policy(UserName=name, PolicyName="template", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def create_table(dynamodb, props):
    args = {
        "TableName": TABLE_NAME,
        "AttributeDefinitions": props["AttributeDefinitions"],
        "KeySchema": props["KeySchema"],
        "BillingMode": props.get("BillingMode", "PAY_PER_REQUEST"),
    }
    if props.get("GlobalSecondaryIndexes"):
        args["GlobalSecondaryIndexes"] = props["GlobalSecondaryIndexes"]
    stream = props.get("StreamSpecification")
    if stream:
        args["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": stream["StreamViewType"]}
    description = dynamodb.create_table(**args)["TableDescription"]
    table_arn = description["TableArn"]
    dynamodb.get_waiter("table_exists").wait(TableName=TABLE_NAME)
    ttl = props.get("TimeToLiveSpecification")
    if ttl and ttl.get("Enabled"):
        dynamodb.update_time_to_live(
            TableName=TABLE_NAME,
            TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": True},
        )
    return table_arn, description.get("LatestStreamArn", "")


def create_events(events, sqs):
    """The bus, a queue that receives every event on it, and the events' dead-letter queue."""
    bus_arn = events.create_event_bus(Name=EVENT_BUS_NAME)["EventBusArn"]
    queue_url = sqs.create_queue(QueueName=EVENT_QUEUE_NAME)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="all-connection-events", EventBusName=EVENT_BUS_NAME,
                    EventPattern=json.dumps({"source": ["klaviyo-connect"]}))
    events.put_targets(Rule="all-connection-events", EventBusName=EVENT_BUS_NAME,
                       Targets=[{"Id": "local-queue", "Arn": queue_arn}])
    dead_letters = sqs.create_queue(QueueName=EVENTS_DEAD_LETTER_QUEUE_NAME)["QueueUrl"]
    dead_letters_arn = sqs.get_queue_attributes(
        QueueUrl=dead_letters, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return bus_arn, queue_url, dead_letters, dead_letters_arn


def create_key(kms):
    key = kms.create_key(Description="klaviyo-connect local envelope key")["KeyMetadata"]
    kms.create_alias(AliasName=KEY_ALIAS, TargetKeyId=key["KeyId"])
    return key["Arn"]


def create_secret(sm, name):
    return sm.create_secret(Name=name, SecretString=secrets.token_urlsafe(48))["ARN"]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--template", required=True)
    parser.add_argument("--state", required=True, help="the stack's state folder (credentials file)")
    parser.add_argument("--api-url", required=True, help="where the functions are served")
    parser.add_argument("--frontend-url", required=True)
    args = parser.parse_args()
    template = load_template(args.template)

    def client(service, key_id, secret):
        return boto3.session.Session(
            aws_access_key_id=key_id, aws_secret_access_key=secret, region_name=REGION
        ).client(service, endpoint_url=args.endpoint)

    # The only calls moto lets through unchecked (UNAUTHENTICATED_CALLS of them).
    admin = create_user(
        client("iam", "bootstrap", "bootstrap"),
        ADMIN_USER,
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]},
    )
    iam = client("iam", *admin)
    iam.list_users()
    try:
        client("iam", "bootstrap", "bootstrap").list_users()
    except ClientError as e:
        if e.response["Error"]["Code"] not in ("InvalidClientTokenId", "AccessDenied"):
            raise
    else:
        sys.exit(f"moto does not enforce IAM: start it with INITIAL_NO_AUTH_ACTION_COUNT={UNAUTHENTICATED_CALLS}")

    table_arn, stream_arn = create_table(client("dynamodb", *admin), table_definition(template))
    bus_arn, event_queue_url, events_dead_letters, events_dead_letters_arn = create_events(client("events", *admin), client("sqs", *admin))
    key_arn = create_key(client("kms", *admin))
    sm = client("secretsmanager", *admin)
    client_secret_arn = create_secret(sm, CLIENT_SECRET_NAME)
    jwt_secret_arn = create_secret(sm, JWT_SECRET_NAME)

    resolve = Resolver(
        refs={
            "ConnectionsTable": TABLE_NAME,
            "CredentialsKey": key_arn.split("/")[-1],
            "KlaviyoClientSecret": client_secret_arn,
            "JwtSecret": jwt_secret_arn,
            "ConnectionEventsBus": EVENT_BUS_NAME,
        },
        attributes={
            "ConnectionsTable.Arn": table_arn,
            "ConnectionsTable.StreamArn": stream_arn,
            "CredentialsKey.Arn": key_arn,
            "ConnectionEventsBus.Arn": bus_arn,
            "EventsDeadLetterQueue.Arn": events_dead_letters_arn,
        },
    )
    # `default` catches a function started without its profile; `secrets-only` is for tests
    # that show what a function does when its policy lacks every table and key action (it can
    # start: it reads its secrets).
    secrets_only = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": "*"}],
    }
    profiles = {
        "default": create_user(iam, NOBODY_USER, None),
        "admin": admin,
        "secrets-only": create_user(iam, SECRETS_ONLY_USER, secrets_only),
    }
    for binary, policy in function_policies(template, resolve).items():
        profiles[binary] = create_user(iam, f"klaviyo-connect-{binary}", policy)
    credentials_file = os.path.join(args.state, "aws-credentials")
    with open(credentials_file, "w") as f:
        for profile, (key_id, secret) in profiles.items():
            f.write(f"[{profile}]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n\n")
    config_file = os.path.join(args.state, "aws-config")
    with open(config_file, "w") as f:
        f.write(f"[default]\nregion = {REGION}\n")

    env = {
        "AWS_ENDPOINT_URL": args.endpoint,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        # Tests and local tools act as the admin; each function runs as its own user (its
        # profile in this file), never with these.
        "AWS_ACCESS_KEY_ID": admin[0],
        "AWS_SECRET_ACCESS_KEY": admin[1],
        "AWS_SHARED_CREDENTIALS_FILE": credentials_file,
        "AWS_CONFIG_FILE": config_file,
        "TABLE_NAME": TABLE_NAME,
        "KMS_KEY_ID": key_arn,
        "KLAVIYO_CLIENT_ID": "local-klaviyo-client",
        "KLAVIYO_CLIENT_SECRET_ARN": client_secret_arn,
        "KLAVIYO_REDIRECT_URI": f"{args.api_url}/klaviyo/oauthcallback",
        "JWT_SECRET_ARN": jwt_secret_arn,
        "JWT_ISSUER": "klaviyo-connect-local",
        "JWT_AUDIENCE": "klaviyo-connect",
        "FRONTEND_URL": args.frontend_url,
        # Added to the frontend's own origin (always allowed): the same page under its other
        # local name, so both kinds of allowed origin are exercised.
        "ALLOWED_ORIGINS": args.frontend_url.replace("127.0.0.1", "localhost"),
        "LOCAL_API_URL": args.api_url,
        # The events function's setting (EVENT_BUS_NAME), and where the events land locally.
        "EVENT_BUS_NAME": EVENT_BUS_NAME,
        "EVENT_QUEUE_URL": event_queue_url,
        "EVENTS_DEAD_LETTER_QUEUE_URL": events_dead_letters,
        "TABLE_STREAM_ARN": stream_arn,
    }
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
