#!/usr/bin/env bash
# The local stack of klaviyo-connect: local AWS (moto in server mode on loopback: DynamoDB
# with its stream, KMS, Secrets Manager, EventBridge and SQS, provisioned from template.yaml,
# with IAM enforced: each function runs as a user whose policy is its policy in template.yaml),
# the local Klaviyo sandbox, the example settings page, and a stream pump that plays Lambda's
# event source mapping (the connection events: EVENT_BUS_NAME, watched on EVENT_QUEUE_URL).
#
#   eval "$(scripts/local-stack.sh up)"   start (or reuse) the stack, print its environment
#   scripts/local-stack.sh down           stop the servers this stack started
#   scripts/local-stack.sh env            print the environment of the running stack
#
# LOCAL_STACK_DIR (default .local/stack) holds the stack's state, so several stacks (a dev
# stack and a test stack) can run side by side. LOCAL_API_PORT (default 9000) sets the URL
# the functions are expected on (`cargo lambda watch` is started separately);
# LOCAL_FRONTEND_PORT and LOCAL_SANDBOX_PORT (default: free ports) where the example
# settings page (FRONTEND_URL) and the sandbox listen.
# Only `export` lines go to stdout; progress goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${LOCAL_STACK_DIR:-$root/.local/stack}"
python="$root/.venv/bin/python"

free_port() {
  "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# process_running NAME PATTERN: the process recorded in $state/NAME.pid is alive and is ours.
process_running() {
  [[ -f "$state/$1.pid" ]] || return 1
  local pid; pid="$(cat "$state/$1.pid")"
  [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "$2"
}

server_running() {
  process_running moto moto_
}

stop_process() {
  process_running "$1" "$2" || return 0
  local pid; pid="$(cat "$state/$1.pid")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do [[ -d "/proc/$pid" ]] || break; sleep 0.1; done
  [[ -d "/proc/$pid" ]] && kill -9 "$pid" 2>/dev/null || true
  echo "Stopped $1 (pid $pid)" >&2
}

# wait_for NAME PATTERN URL: until URL answers, or the process dies, or 30 s pass.
wait_for() {
  for _ in $(seq 1 150); do
    if "$python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "$3" 2>/dev/null; then
      return 0
    fi
    process_running "$1" "$2" || { echo "$1 exited; see $state/$1.log" >&2; tail -20 "$state/$1.log" >&2; return 1; }
    sleep 0.2
  done
  echo "$1 did not answer on $3 within 30 s; see $state/$1.log" >&2
  return 1
}

up() {
  "$root/scripts/venv.sh"
  local template_hash; template_hash="$(sha256sum "$root/template.yaml" | cut -d' ' -f1)"
  if server_running && process_running sandbox klaviyo-sandbox && process_running page serve_page \
      && process_running pump stream_pump && [[ -f "$state/env.sh" ]]; then
    # The functions' IAM users are made from template.yaml: a changed template needs a new stack.
    if [[ "$(cat "$state/template.sha256" 2>/dev/null)" == "$template_hash" ]]; then
      cat "$state/env.sh"
      return 0
    fi
    echo "template.yaml changed since this stack was provisioned: starting a fresh one" >&2
  fi
  down 2>/dev/null  # a half-started stack is replaced whole
  mkdir -p "$state"
  local port; port="${MOTO_PORT:-$(free_port)}"
  local api_url="http://127.0.0.1:${LOCAL_API_PORT:-9000}"
  local frontend_port; frontend_port="${LOCAL_FRONTEND_PORT:-$(free_port)}"
  local endpoint="http://127.0.0.1:$port"
  # IAM is enforced after the three calls that create provisioning's admin user; every later
  # request is authorized the way AWS does it (scripts/moto_iam_server.py).
  echo "Starting moto on $endpoint, IAM enforced (log: $state/moto.log)" >&2
  INITIAL_NO_AUTH_ACTION_COUNT=3 MOTO_IAM_AUDIT_LOG="$state/iam-audit.jsonl" nohup "$python" "$root/scripts/moto_iam_server.py" -H 127.0.0.1 -p "$port" \
    > "$state/moto.log" 2>&1 &
  echo $! > "$state/moto.pid"
  wait_for moto moto_ "$endpoint/moto-api/"
  "$python" "$root/scripts/provision.py" \
    --endpoint "$endpoint" \
    --template "$root/template.yaml" \
    --state "$state" \
    --api-url "$api_url" \
    --frontend-url "http://127.0.0.1:$frontend_port" > "$state/env.sh.tmp"

  # The Klaviyo sandbox reads the client secret from the local Secrets Manager, like Klaviyo
  # knows it independently of the functions.
  echo "Building the Klaviyo sandbox..." >&2
  (cd "$root" && cargo build --quiet -p klaviyo-sandbox >&2)
  local sandbox_port; sandbox_port="${LOCAL_SANDBOX_PORT:-$(free_port)}"
  local sandbox="http://127.0.0.1:$sandbox_port"
  echo "Starting the Klaviyo sandbox on $sandbox (log: $state/sandbox.log)" >&2
  (set -a; source "$state/env.sh.tmp"; exec nohup "$root/target/debug/klaviyo-sandbox" --port "$sandbox_port") \
    > "$state/sandbox.log" 2>&1 &
  echo $! > "$state/sandbox.pid"
  wait_for sandbox klaviyo-sandbox "$sandbox/sandbox/health"
  cat >> "$state/env.sh.tmp" <<EXPORTS
export KLAVIYO_AUTHORIZE_URL=$sandbox/oauth/authorize
export KLAVIYO_OAUTH_BASE=$sandbox
export KLAVIYO_API_BASE=$sandbox/api
export KLAVIYO_SANDBOX_URL=$sandbox
EXPORTS

  # The page's host app signs dev sessions with the stack's JWT key (from its Secrets Manager)
  # and lets the page open only the sandbox's authorize URL, the one the functions use.
  echo "Serving the settings page on http://127.0.0.1:$frontend_port (log: $state/page.log)" >&2
  (set -a; source "$state/env.sh.tmp"; exec nohup "$python" "$root/scripts/serve_page.py" --port "$frontend_port" \
    --api-url "$api_url" --klaviyo-authorize-url "$KLAVIYO_AUTHORIZE_URL") \
    > "$state/page.log" 2>&1 &
  echo $! > "$state/page.pid"
  wait_for page serve_page "http://127.0.0.1:$frontend_port/settings"

  # Lambda's event source mapping, locally: the table's stream to the events function (it
  # waits for the functions to be served).
  # The settings are complete: the pump reads the final file (a background process that read
  # the temporary one could find it already renamed).
  echo "$template_hash" > "$state/template.sha256"
  mv "$state/env.sh.tmp" "$state/env.sh"
  echo "Pumping the table's stream to the events function (log: $state/pump.log)" >&2
  (set -a; source "$state/env.sh"; exec nohup "$python" "$root/scripts/stream_pump.py" \
    --template "$root/template.yaml" --api-url "$api_url") > "$state/pump.log" 2>&1 &
  echo $! > "$state/pump.pid"
  # It has no port to probe: it is up once it says so. (Alive, not "ours": until the subshell
  # has exec'd Python, its command line is still this script's.)
  local pump_pid; pump_pid="$(cat "$state/pump.pid")"
  for _ in $(seq 1 50); do
    grep -q "pumping the table's stream" "$state/pump.log" 2>/dev/null && break
    kill -0 "$pump_pid" 2>/dev/null || { echo "the stream pump exited; see $state/pump.log" >&2; tail -20 "$state/pump.log" >&2; rm -f "$state/env.sh"; return 1; }
    sleep 0.2
  done
  cat "$state/env.sh"
}

down() {
  stop_process pump stream_pump
  stop_process sandbox klaviyo-sandbox
  stop_process page serve_page
  stop_process moto moto_
  rm -rf "$state"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) server_running && cat "$state/env.sh" || { echo "no local stack running in $state" >&2; exit 1; } ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
