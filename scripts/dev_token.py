#!/usr/bin/env python3
"""Prints an HS256 JWT for a user, signed with the local stack's JWT secret (read from its
Secrets Manager, like the functions do). Usage: dev_token.py USER_ID [TTL_SECONDS]"""

import base64
import hashlib
import hmac
import json
import os
import sys
import time

import boto3


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main():
    if len(sys.argv) < 2 or not sys.argv[1]:
        sys.exit("usage: dev-token.sh USER_ID [TTL_SECONDS]")
    user_id = sys.argv[1]
    ttl = int(sys.argv[2]) if len(sys.argv) > 2 else 3600
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    key = boto3.client("secretsmanager", region_name=region).get_secret_value(SecretId=os.environ["JWT_SECRET_ARN"])["SecretString"].strip()
    now = int(time.time())
    claims = {"sub": user_id, "iat": now, "exp": now + ttl}
    if os.environ.get("JWT_ISSUER"):
        claims["iss"] = os.environ["JWT_ISSUER"]
    if os.environ.get("JWT_AUDIENCE"):
        claims["aud"] = os.environ["JWT_AUDIENCE"]
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(key.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    print(f"{header}.{payload}.{b64url(signature)}")


if __name__ == "__main__":
    main()
