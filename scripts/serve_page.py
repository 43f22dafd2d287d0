"""Serves the example settings page (examples/settings-page) on loopback: the local stack's
FRONTEND_URL, where the callback sends the browser back (/settings?connected=klaviyo …).

    python scripts/serve_page.py --port 9300 --api-url http://127.0.0.1:9000

/ and /settings are the page; its script and stylesheet are the only other files served.
Responses carry a strict content security policy that lets the page call only the API.
"""

import argparse
import http.server
import pathlib
import sys
from urllib.parse import urlsplit

ROOT = pathlib.Path(__file__).resolve().parent.parent / "examples" / "settings-page"
ROUTES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/settings": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/styles.css": ("styles.css", "text/css; charset=utf-8"),
}


def handler(api_origin: str):
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {api_origin}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )

    class Page(http.server.BaseHTTPRequestHandler):
        server_version = "settings-page"
        sys_version = ""

        def do_GET(self):
            self.serve(with_body=True)

        def do_HEAD(self):
            self.serve(with_body=False)

        def serve(self, with_body: bool):
            route = ROUTES.get(urlsplit(self.path).path)
            if route is None:
                self.send_error(404, "Not found")
                return
            name, content_type = route
            body = (ROOT / name).read_bytes()
            self.send_response(200)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.send_header("content-security-policy", policy)
            self.send_header("x-content-type-options", "nosniff")
            self.send_header("referrer-policy", "no-referrer")
            self.send_header("cache-control", "no-cache")
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, format, *args):
            # Requests are not logged: the page's address can carry a JWT in its fragment
            # (browsers never send fragments, but keep this server quiet all the same).
            pass

    return Page


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9300)
    parser.add_argument("--api-url", required=True, help="where the functions answer")
    args = parser.parse_args()
    api = urlsplit(args.api_url)
    if api.scheme not in ("http", "https") or not api.netloc:
        parser.error("--api-url must be an http(s) URL")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", args.port), handler(f"{api.scheme}://{api.netloc}")
    )
    print(f"settings page on http://127.0.0.1:{args.port}/settings", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
