#!/usr/bin/env python3
"""Provisions the local stack in a running moto server and prints its environment.

The DynamoDB table (keys, indexes, TTL) is created from the ConnectionsTable resource in
template.yaml, so the local table cannot drift from the deployed one. The KMS key and the two
secrets get fresh random local values. Output: `export NAME=value` lines on stdout.

Idempotent: an existing table, key alias or secret is reused.
"""

import argparse
import secrets
import shlex
import sys

import boto3
import yaml

TABLE_NAME = "klaviyo-connect-local"
KEY_ALIAS = "alias/klaviyo-connect-local"
CLIENT_SECRET_NAME = "klaviyo-connect/local/klaviyo-client-secret"
JWT_SECRET_NAME = "klaviyo-connect/local/jwt-secret"


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


def table_definition(template_path):
    with open(template_path) as f:
        template = yaml.load(f, Loader=CfnLoader)
    tables = [r for r in template["Resources"].values() if r["Type"] == "AWS::DynamoDB::Table"]
    if len(tables) != 1:
        sys.exit(f"expected exactly one AWS::DynamoDB::Table in {template_path}, found {len(tables)}")
    return tables[0]["Properties"]


def create_table(dynamodb, props):
    names = dynamodb.list_tables()["TableNames"]
    if TABLE_NAME not in names:
        args = {
            "TableName": TABLE_NAME,
            "AttributeDefinitions": props["AttributeDefinitions"],
            "KeySchema": props["KeySchema"],
            "BillingMode": props.get("BillingMode", "PAY_PER_REQUEST"),
        }
        if props.get("GlobalSecondaryIndexes"):
            args["GlobalSecondaryIndexes"] = props["GlobalSecondaryIndexes"]
        dynamodb.create_table(**args)
        dynamodb.get_waiter("table_exists").wait(TableName=TABLE_NAME)
    ttl = props.get("TimeToLiveSpecification")
    if ttl and ttl.get("Enabled"):
        current = dynamodb.describe_time_to_live(TableName=TABLE_NAME)["TimeToLiveDescription"]
        if current.get("TimeToLiveStatus") != "ENABLED":
            dynamodb.update_time_to_live(
                TableName=TABLE_NAME,
                TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": True},
            )


def create_key(kms):
    for alias in kms.list_aliases()["Aliases"]:
        if alias["AliasName"] == KEY_ALIAS and alias.get("TargetKeyId"):
            return kms.describe_key(KeyId=alias["TargetKeyId"])["KeyMetadata"]["Arn"]
    key = kms.create_key(Description="klaviyo-connect local envelope key")["KeyMetadata"]
    kms.create_alias(AliasName=KEY_ALIAS, TargetKeyId=key["KeyId"])
    return key["Arn"]


def create_secret(sm, name):
    try:
        return sm.describe_secret(SecretId=name)["ARN"]
    except sm.exceptions.ResourceNotFoundException:
        return sm.create_secret(Name=name, SecretString=secrets.token_urlsafe(48))["ARN"]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--template", required=True)
    parser.add_argument("--api-url", required=True, help="where the functions are served")
    parser.add_argument("--frontend-url", required=True)
    args = parser.parse_args()

    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    client = lambda service: session.client(service, endpoint_url=args.endpoint)  # noqa: E731
    create_table(client("dynamodb"), table_definition(args.template))
    key_arn = create_key(client("kms"))
    sm = client("secretsmanager")

    env = {
        "AWS_ENDPOINT_URL": args.endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Fake credentials: moto accepts any; real ones must never be needed locally.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "TABLE_NAME": TABLE_NAME,
        "KMS_KEY_ID": key_arn,
        "KLAVIYO_CLIENT_ID": "local-klaviyo-client",
        "KLAVIYO_CLIENT_SECRET_ARN": create_secret(sm, CLIENT_SECRET_NAME),
        "KLAVIYO_REDIRECT_URI": f"{args.api_url}/klaviyo/oauthcallback",
        "JWT_SECRET_ARN": create_secret(sm, JWT_SECRET_NAME),
        "JWT_ISSUER": "klaviyo-connect-local",
        "JWT_AUDIENCE": "klaviyo-connect",
        "FRONTEND_URL": args.frontend_url,
        "ALLOWED_ORIGINS": args.frontend_url,
        "LOCAL_API_URL": args.api_url,
    }
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
