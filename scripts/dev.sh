#!/usr/bin/env bash
# `make dev`: the whole system on this machine: local AWS (moto, with the connection events'
# bus and the stream pump), the local Klaviyo sandbox
# on http://127.0.0.1:${LOCAL_SANDBOX_PORT:-9100}, the seven functions under `cargo lambda
# watch` on http://127.0.0.1:${LOCAL_API_PORT:-9000} (rebuilt as you edit), the example
# settings page on http://127.0.0.1:${LOCAL_FRONTEND_PORT:-9300}/settings with a dev sign-in
# link, and a ready JWT.
# Ctrl-C stops everything it started.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/venv.sh
export LOCAL_STACK_DIR="${LOCAL_STACK_DIR:-$root/.local/stack}"
export LOCAL_API_PORT="${LOCAL_API_PORT:-9000}"
export LOCAL_SANDBOX_PORT="${LOCAL_SANDBOX_PORT:-9100}"
export LOCAL_FRONTEND_PORT="${LOCAL_FRONTEND_PORT:-9300}"
watch_pid=""
cleanup() {
  [[ -n "$watch_pid" ]] && kill -TERM -- "-$watch_pid" 2>/dev/null || true
  scripts/local-stack.sh down
}
trap cleanup EXIT INT TERM

eval "$(scripts/local-stack.sh up)"
echo "Building and starting the functions (the first build takes a few minutes)..." >&2
setsid scripts/watch.sh &
watch_pid=$!
.venv/bin/python scripts/warm_up.py "$LOCAL_API_URL" 900

token="$(scripts/dev-token.sh local-user-1 86400)"
cat <<BANNER

klaviyo-connect is running locally.

  Settings page (example)    $FRONTEND_URL/settings
  API (cargo lambda watch)   $LOCAL_API_URL
  Klaviyo sandbox            $KLAVIYO_SANDBOX_URL
  Local AWS (moto)           $AWS_ENDPOINT_URL   table $TABLE_NAME

Sign in to the settings page as user "local-user-1" (a dev-only stand-in for your app's
sign-in: any user id, no password; the page gets short-lived JWTs from the page server's
/session), click Connect Klaviyo, and choose Allow or Deny on the sandbox's consent screen:

  $FRONTEND_URL/dev/sign-in?user=local-user-1

A JWT for user "local-user-1", valid 24 h (another: scripts/dev-token.sh USER_ID):

  export TOKEN=$token

Connect a Klaviyo account through the sandbox (the whole walk-through: docs/HOST-APP.md):
  AUTH_URL=\$(curl -s -H "Authorization: Bearer \$TOKEN" "$LOCAL_API_URL/api/oauth/connect/klaviyo?accountName=Main%20store" | python3 -c 'import json,sys; print(json.load(sys.stdin)["authUrl"])')
  CALLBACK=\$(curl -s -o /dev/null -w '%{redirect_url}' "\$AUTH_URL")   # the sandbox approves
  LANDING=\$(curl -s -o /dev/null -w '%{redirect_url}' "\$CALLBACK")   # $FRONTEND_URL/settings?connected=klaviyo&completion=…
  COMPLETION=\$(python3 -c 'import sys,urllib.parse as u; print(u.parse_qs(u.urlsplit(sys.argv[1]).query)["completion"][0])' "\$LANDING")
  curl -s -X POST -H "Authorization: Bearer \$TOKEN" -H 'content-type: application/json' -d "{\"completion\":\"\$COMPLETION\"}" "$LOCAL_API_URL/api/oauth/connect/klaviyo/complete"   # now connected: {"success":true,"account":{…}}

Connection events (Created, Reauthorized, Needs Reauth, Degraded, Recovered, Disconnected) go
to the local EventBridge bus $EVENT_BUS_NAME; watch them arrive in another shell:
  eval "\$(scripts/local-stack.sh env)"; .venv/bin/python scripts/watch_events.py

The stack's settings, for other shells:  eval "\$(scripts/local-stack.sh env)"
Ctrl-C stops everything.
BANNER
wait "$watch_pid"
