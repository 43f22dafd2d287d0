#!/usr/bin/env python3
"""Waits until `cargo lambda watch` answers, then sends each function one request so that
every function is built and running before anyone (a test, a developer) depends on it.
Usage: warm_up.py API_URL [TIMEOUT_SECONDS]"""

import json
import pathlib
import sys
import time
import urllib.error
import urllib.request

ROUTES = [
    ("GET", "/api/oauth/connect/klaviyo"),
    ("GET", "/klaviyo/oauthcallback"),
    ("GET", "/api/oauth/accounts"),
    ("DELETE", "/api/oauth/accounts/warm-up"),
]


class NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


OPENER = urllib.request.build_opener(NoRedirects)


def request(method, url, body=None, timeout=300):
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with OPENER.open(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def main():
    api = sys.argv[1].rstrip("/")
    deadline = time.time() + (float(sys.argv[2]) if len(sys.argv) > 2 else 300)
    while True:
        try:
            # The invoke endpoint of an unknown function answers at once: the server is up.
            request("GET", f"{api}/lambda-url/none/", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            if time.time() > deadline:
                sys.exit(f"cargo lambda watch did not answer on {api}")
            time.sleep(0.3)
    for method, path in ROUTES:
        status, _ = request(method, f"{api}{path}")
        if status >= 500 and status != 501:
            sys.exit(f"{method} {path} answered {status} during warm-up")
    event = (pathlib.Path(__file__).parent.parent / "events" / "scheduled.json").read_bytes()
    status, body = request("POST", f"{api}/2015-03-31/functions/refresh/invocations", event)
    if status != 200:
        sys.exit(f"refresh invocation answered {status}: {body[:200]!r}")
    summary = json.loads(body)
    if "refreshed" not in summary:
        sys.exit(f"refresh returned no summary: {summary}")
    # The events function, with an empty stream batch (the stream pump sends it real ones).
    status, body = request("POST", f"{api}/2015-03-31/functions/events/invocations", b'{"Records": []}')
    if status != 200 or json.loads(body).get("published") != 0:
        sys.exit(f"events invocation answered {status}: {body[:200]!r}")
    # The token function, for a connection nobody has: an answer, not a failure.
    status, body = request("POST", f"{api}/2015-03-31/functions/token/invocations",
                           json.dumps({"userId": "warm-up", "connectionId": "00000000-0000-0000-0000-000000000000"}).encode())
    if status != 200 or json.loads(body).get("error", {}).get("code") != "not_found":
        sys.exit(f"token invocation answered {status}: {body[:200]!r}")
    print("All seven functions are up.", file=sys.stderr)


if __name__ == "__main__":
    main()
