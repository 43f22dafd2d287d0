"""Serves the example settings page (examples/settings-page) on loopback and plays the host
app around it, for local development only. It is the local stack's FRONTEND_URL, where the
callback sends the browser back (/settings?connected=klaviyo&completion=…).

    python scripts/serve_page.py --port 9300 --api-url http://127.0.0.1:9000 \\
        --klaviyo-authorize-url http://127.0.0.1:9100/oauth/authorize

Routes:
  /settings (and /)       the page; /app.js and /styles.css are the only other files served
  /settings-config.json   the page's settings, as a host app would provide them
  /session                a short-lived JWT for the signed-in user (401 when nobody is)
  /dev/sign-in?user=ID    DEV ONLY: signs in as any user id, no password; a real host app has
                          its own sign-in and never anything like this
  /dev/sign-out           (POST) ends the session

Sessions are random ids in an HttpOnly, SameSite=Lax cookie, mapped to user ids in memory (a
restart signs everyone out). /session signs HS256 JWTs with the local stack's JWT key, read
from its Secrets Manager (JWT_SECRET_ARN, AWS_ENDPOINT_URL) like scripts/dev_token.py, with
JWT_ISSUER and JWT_AUDIENCE when set. Every response carries a strict content security
policy: the page may call only the API and this server.
"""

import argparse
import base64
import hashlib
import hmac
import http.server
import json
import os
import pathlib
import re
import secrets
import sys
import threading
import time
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlsplit

ROOT = pathlib.Path(__file__).resolve().parent.parent / "examples" / "settings-page"
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/settings": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/styles.css": ("styles.css", "text/css; charset=utf-8"),
}
COOKIE = "settings_session"
SESSION_SECONDS = 12 * 3600
USER_ID = re.compile(r"[A-Za-z0-9._@-]{1,64}")
# The functions refuse shorter HS256 keys; refusing here too names the problem at start-up.
MIN_KEY_BYTES = 32


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Signer:
    """Mints the JWTs the functions accept for a user."""

    def __init__(self, key: bytes, ttl: int, issuer: str | None, audience: str | None):
        self.key, self.ttl, self.issuer, self.audience = key, ttl, issuer, audience

    def token(self, user_id: str) -> str:
        now = int(time.time())
        claims = {"sub": user_id, "iat": now, "exp": now + self.ttl}
        if self.issuer:
            claims["iss"] = self.issuer
        if self.audience:
            claims["aud"] = self.audience
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
        signature = hmac.new(self.key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{b64url(signature)}"


def local_signer(ttl: int) -> Signer:
    arn = os.environ.get("JWT_SECRET_ARN")
    if not arn:
        sys.exit("JWT_SECRET_ARN is not set: /session signs with the local stack's JWT key "
                 "(start this from scripts/local-stack.sh, or eval its env first)")
    import boto3  # the project's .venv has it

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    secret = boto3.client("secretsmanager", region_name=region).get_secret_value(SecretId=arn)
    key = secret["SecretString"].strip().encode()
    if len(key) < MIN_KEY_BYTES:
        sys.exit(f"the JWT key in JWT_SECRET_ARN has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return Signer(key, ttl, os.environ.get("JWT_ISSUER"), os.environ.get("JWT_AUDIENCE"))


def handler(config: dict, api_origin: str, signer: Signer, port: int):
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self' {api_origin}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    config_body = json.dumps(config).encode()
    hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
    sessions: dict[str, tuple[str, float]] = {}  # session id -> (user id, valid until)
    lock = threading.Lock()

    class HostApp(http.server.BaseHTTPRequestHandler):
        server_version = "settings-page"
        sys_version = ""

        def do_GET(self):
            self.route(with_body=True)

        def do_HEAD(self):
            self.route(with_body=False)

        def do_POST(self):
            url = urlsplit(self.path)
            if not self.host_allowed():
                self.send(421, b"unknown host\n", "text/plain; charset=utf-8")
            elif url.path != "/dev/sign-out":
                self.send(405, b"method not allowed\n", "text/plain; charset=utf-8", allow="GET, HEAD")
            elif not self.from_this_site():
                self.send(403, b"sign-out must come from this site\n", "text/plain; charset=utf-8")
            else:
                with lock:
                    sessions.pop(self.session_id() or "", None)
                self.redirect("/settings", f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax")

        def route(self, with_body: bool):
            url = urlsplit(self.path)
            if not self.host_allowed():
                # A DNS-rebinding page (evil.example resolving to 127.0.0.1) would otherwise
                # be same-origin with this server and could read /session's JWTs.
                self.send(421, b"unknown host\n", "text/plain; charset=utf-8", with_body)
            elif url.path in FILES:
                name, content_type = FILES[url.path]
                self.send(200, (ROOT / name).read_bytes(), content_type, with_body, cache="no-cache")
            elif url.path == "/settings-config.json":
                self.send(200, config_body, "application/json", with_body, cache="no-cache")
            elif url.path == "/session":
                self.session(with_body)
            elif url.path == "/dev/sign-in" and with_body:
                self.sign_in(parse_qs(url.query).get("user", [""])[0])
            else:
                self.send(404, b"not found\n", "text/plain; charset=utf-8", with_body)

        def session(self, with_body: bool):
            if not self.from_this_site():
                body = {"error": {"code": "forbidden", "message": "Only this site's pages may ask."}}
                self.send(403, json.dumps(body).encode(), "application/json", with_body)
                return
            with lock:
                user, until = sessions.get(self.session_id() or "", (None, 0))
            if user is None or until < time.time():
                body = {"error": {"code": "signed_out", "message": "Nobody is signed in."}}
                self.send(401, json.dumps(body).encode(), "application/json", with_body)
                return
            body = {"token": signer.token(user), "sub": user, "expiresIn": signer.ttl}
            self.send(200, json.dumps(body).encode(), "application/json", with_body)

        def sign_in(self, user: str):
            # A link from another site must not sign the browser in as someone else (login
            # CSRF, the very attack the completion step defends against). A link opened from
            # the terminal or typed in ("none") and the page's own form ("same-origin") may.
            if not self.from_this_site():
                self.send(403, b"dev sign-in only from this site or the address bar\n", "text/plain; charset=utf-8")
                return
            if not USER_ID.fullmatch(user):
                self.send(400, b"dev sign-in: user must be 1-64 of A-Z a-z 0-9 . _ @ -\n", "text/plain; charset=utf-8")
                return
            session_id = secrets.token_urlsafe(32)
            with lock:
                sessions[session_id] = (user, time.time() + SESSION_SECONDS)
            self.redirect(
                "/settings",
                f"{COOKIE}={session_id}; Path=/; Max-Age={SESSION_SECONDS}; HttpOnly; SameSite=Lax",
            )

        def from_this_site(self) -> bool:
            # Browsers send Sec-Fetch-Site on every request to a trustworthy origin (loopback
            # is one); without it (an old browser, a tool) nobody can tell, so it is refused.
            return self.headers.get("sec-fetch-site") in ("none", "same-origin")

        def host_allowed(self) -> bool:
            return self.headers.get("host", "") in hosts

        def session_id(self) -> str | None:
            try:
                cookie = SimpleCookie(self.headers.get("cookie", ""))
            except CookieError:
                return None
            return cookie[COOKIE].value if COOKIE in cookie else None

        def redirect(self, location: str, cookie: str):
            self.send_response(303)
            self.send_header("location", location)
            self.send_header("set-cookie", cookie)
            self.send_header("content-length", "0")
            self.security_headers("no-store")
            self.end_headers()

        def send(self, status, body, content_type, with_body=True, cache="no-store", allow=None):
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            if allow:
                self.send_header("allow", allow)
            self.security_headers(cache)
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def security_headers(self, cache: str):
            self.send_header("content-security-policy", policy)
            self.send_header("x-content-type-options", "nosniff")
            self.send_header("referrer-policy", "no-referrer")
            self.send_header("cache-control", cache)

        def log_message(self, format, *args):
            # Requests are not logged: the page's address carries one-time completion handles.
            pass

    return HostApp


def origin_of(parser, flag: str, value: str) -> str:
    url = urlsplit(value)
    if url.scheme not in ("http", "https") or not url.netloc:
        parser.error(f"{flag} must be an http(s) URL")
    return f"{url.scheme}://{url.netloc}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9300)
    parser.add_argument("--api-url", required=True, help="where the functions answer")
    parser.add_argument(
        "--klaviyo-authorize-url", required=True,
        help="the functions' KLAVIYO_AUTHORIZE_URL: the page opens only authorize URLs on its origin",
    )
    parser.add_argument("--jwt-ttl", type=int, default=300, help="lifetime of /session's JWTs, seconds")
    args = parser.parse_args()
    if not 60 <= args.jwt_ttl <= 3600:
        parser.error("--jwt-ttl must be 60-3600 seconds")
    api_origin = origin_of(parser, "--api-url", args.api_url)
    config = {
        "apiUrl": args.api_url.rstrip("/"),
        "klaviyoAuthorizeOrigin": origin_of(parser, "--klaviyo-authorize-url", args.klaviyo_authorize_url),
        "sessionUrl": "/session",
        "signInUrl": "/dev/sign-in",
        "signOutUrl": "/dev/sign-out",
        # The page offers "sign in as any user id": only this dev stand-in sets it.
        "devSignIn": True,
    }
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", args.port), handler(config, api_origin, local_signer(args.jwt_ttl), args.port)
    )
    print(f"settings page on http://127.0.0.1:{args.port}/settings "
          f"(dev sign-in: /dev/sign-in?user=ID)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
