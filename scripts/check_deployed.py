#!/usr/bin/env python3
"""Checks that a deployed stack answers: the settings page's calls, as a browser on the
frontend's origin would make them, with a JWT minted from the stack's own JWT secret.

    check_deployed.py --stack NAME            a stack on AWS (reads its outputs and parameters)
    check_deployed.py --api-url URL --jwt-secret-arn ARN --frontend-url URL [--issuer I] [--audience A]
                                              any deployment, the local stack included

Checks, each printed with its outcome (the exit status is non-zero if any fails):
  1. CORS preflight from the frontend's origin is allowed;
  2. GET /api/oauth/accounts with the JWT answers 200 and a list;
  3. GET /api/oauth/connect/klaviyo answers an authorize URL whose redirect_uri is this API's
     callback (it leaves one pending authorization for the check's user, gone in 10 minutes);
  4. an unknown path answers 404 `not_found` in the one error shape, readable by the page;
  5. (stacks) the Klaviyo client secret has been put since the deploy generated a placeholder.
Uses the AWS credentials of the environment (it reads the JWT secret and, for --stack, the
stack's outputs).
"""

import argparse
import base64
import hashlib
import hmac
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import os

import boto3
import botocore.exceptions

CHECK_USER = "klaviyo-connect-deploy-check"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(key: str, issuer: str, audience: str) -> str:
    now = int(time.time())
    claims = {"sub": CHECK_USER, "iat": now, "exp": now + 300}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(key.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer to check, never followed: the JWT must not travel elsewhere."""

    def redirect_request(self, *args, **kwargs):
        return None


OPENER = urllib.request.build_opener(NoRedirects)


def request(method, url, headers):
    """(status, headers, body) without following redirects or raising on 4xx/5xx."""
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with OPENER.open(req, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def require_https(url):
    """The JWT goes over https only (plain http for the local stack on loopback)."""
    parts = urllib.parse.urlsplit(url)
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        sys.exit(f"refusing to send a JWT to {url}: https only (http only for loopback)")


def client(service):
    # The region as the Rust SDK and the AWS CLI find it (boto3 alone ignores AWS_REGION).
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.client(service, region_name=region) if region else boto3.client(service)


def stack_settings(name):
    stack = client("cloudformation").describe_stacks(StackName=name)["Stacks"][0]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    parameters = {p["ParameterKey"]: p.get("ParameterValue", "") for p in stack.get("Parameters", [])}
    return {
        "api_url": outputs["ApiUrl"],
        "jwt_secret_arn": outputs["JwtSecretArn"],
        "client_secret_arn": outputs["KlaviyoClientSecretArn"],
        "frontend_url": parameters["FrontendUrl"],
        "issuer": parameters.get("JwtIssuer", ""),
        "audience": parameters.get("JwtAudience", ""),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack")
    parser.add_argument("--api-url")
    parser.add_argument("--jwt-secret-arn")
    parser.add_argument("--frontend-url")
    parser.add_argument("--issuer", default="")
    parser.add_argument("--audience", default="")
    args = parser.parse_args()
    if args.stack:
        settings = stack_settings(args.stack)
    elif args.api_url and args.jwt_secret_arn and args.frontend_url:
        settings = {
            "api_url": args.api_url,
            "jwt_secret_arn": args.jwt_secret_arn,
            "client_secret_arn": None,
            "frontend_url": args.frontend_url,
            "issuer": args.issuer,
            "audience": args.audience,
        }
    else:
        parser.error("give --stack, or --api-url, --jwt-secret-arn and --frontend-url")

    api = settings["api_url"].rstrip("/")
    require_https(api)
    origin = "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(settings["frontend_url"]))
    secrets = client("secretsmanager")
    key = secrets.get_secret_value(SecretId=settings["jwt_secret_arn"])["SecretString"].strip()
    token = jwt(key, settings["issuer"], settings["audience"])
    failures = 0

    def check(what, ok, detail=""):
        nonlocal failures
        failures += 0 if ok else 1
        print(f"  {'ok  ' if ok else 'FAIL'}  {what}" + (f": {detail}" if detail and not ok else ""))

    print(f"Checking {api}/ as {origin} would call it:")
    status, headers, _ = request("OPTIONS", f"{api}/api/oauth/accounts", {
        "Origin": origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
    check("CORS preflight from the frontend's origin", status == 204 and headers.get("access-control-allow-origin") == origin,
          f"{status}, allow-origin {headers.get('access-control-allow-origin')!r}")

    auth = {"Origin": origin, "Authorization": f"Bearer {token}"}
    status, headers, body = request("GET", f"{api}/api/oauth/accounts", auth)
    listed = status == 200 and json.loads(body or b"{}").get("success") is True
    check("GET /api/oauth/accounts with a minted JWT", listed and headers.get("access-control-allow-origin") == origin,
          f"{status} {body[:300]!r}")

    status, _, body = request("GET", f"{api}/api/oauth/connect/klaviyo", auth)
    try:
        auth_url = urllib.parse.urlsplit(json.loads(body)["authUrl"])
        query = urllib.parse.parse_qs(auth_url.query)
        redirect = query.get("redirect_uri", [""])[0]
        started = status == 200 and query.get("code_challenge_method") == ["S256"] and redirect == f"{api}/klaviyo/oauthcallback"
    except (ValueError, KeyError, TypeError):
        started, redirect = False, None
    check("GET /api/oauth/connect/klaviyo starts OAuth with this API's callback", started,
          f"{status} redirect_uri {redirect!r} {body[:300]!r}")

    status, headers, body = request("GET", f"{api}/{CHECK_USER}/no-such-route", {"Origin": origin})
    try:
        error = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        error = None
    check("an unknown path answers 404 not_found with CORS", status == 404 and error == "not_found"
          and headers.get("access-control-allow-origin") == origin, f"{status} {body[:300]!r}")

    if settings["client_secret_arn"]:
        versions = secrets.list_secret_version_ids(SecretId=settings["client_secret_arn"])["Versions"]
        check("the Klaviyo client secret was put after the deploy", len(versions) > 1,
              "it is still the generated placeholder: aws secretsmanager put-secret-value "
              f"--secret-id {settings['client_secret_arn']} --secret-string file://klaviyo-client-secret.txt")

    print("All checks passed." if failures == 0 else f"{failures} check(s) failed.")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    try:
        main()
    except botocore.exceptions.NoRegionError:
        sys.exit("no AWS region: set AWS_REGION (or a region in your AWS profile)")
    except botocore.exceptions.NoCredentialsError:
        sys.exit("no AWS credentials: run `aws configure`, or set AWS_PROFILE")
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        sys.exit(f"AWS refused or could not be reached: {error}")
