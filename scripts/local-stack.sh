#!/usr/bin/env bash
# Local AWS for klaviyo-connect: moto in server mode on loopback (DynamoDB, KMS, Secrets
# Manager), provisioned from template.yaml.
#
#   eval "$(scripts/local-stack.sh up)"   start (or reuse) the stack, print its environment
#   scripts/local-stack.sh down           stop the server this stack started
#   scripts/local-stack.sh env            print the environment of the running stack
#
# LOCAL_STACK_DIR (default .local/stack) holds the stack's state, so several stacks (a dev
# stack and a test stack) can run side by side. LOCAL_API_PORT (default 9000) and
# LOCAL_FRONTEND_PORT (default 9300) set the URLs printed for the functions and the page.
# Only `export` lines go to stdout; progress goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${LOCAL_STACK_DIR:-$root/.local/stack}"
python="$root/.venv/bin/python"

free_port() {
  "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

server_running() {
  [[ -f "$state/moto.pid" ]] || return 1
  local pid; pid="$(cat "$state/moto.pid")"
  [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q moto_server
}

wait_for_server() {
  local url="$1"
  for _ in $(seq 1 150); do
    if "$python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "$url/moto-api/" 2>/dev/null; then
      return 0
    fi
    server_running || { echo "moto_server exited; see $state/moto.log" >&2; tail -20 "$state/moto.log" >&2; return 1; }
    sleep 0.2
  done
  echo "moto_server did not answer on $url within 30 s; see $state/moto.log" >&2
  return 1
}

up() {
  "$root/scripts/venv.sh"
  if server_running && [[ -f "$state/env.sh" ]]; then
    cat "$state/env.sh"
    return 0
  fi
  mkdir -p "$state"
  local port; port="${MOTO_PORT:-$(free_port)}"
  local endpoint="http://127.0.0.1:$port"
  echo "Starting moto_server on $endpoint (log: $state/moto.log)" >&2
  nohup "$root/.venv/bin/moto_server" -H 127.0.0.1 -p "$port" > "$state/moto.log" 2>&1 &
  echo $! > "$state/moto.pid"
  wait_for_server "$endpoint"
  "$python" "$root/scripts/provision.py" \
    --endpoint "$endpoint" \
    --template "$root/template.yaml" \
    --api-url "http://127.0.0.1:${LOCAL_API_PORT:-9000}" \
    --frontend-url "http://127.0.0.1:${LOCAL_FRONTEND_PORT:-9300}" > "$state/env.sh.tmp"
  mv "$state/env.sh.tmp" "$state/env.sh"
  cat "$state/env.sh"
}

down() {
  if server_running; then
    local pid; pid="$(cat "$state/moto.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do [[ -d "/proc/$pid" ]] || break; sleep 0.1; done
    [[ -d "/proc/$pid" ]] && kill -9 "$pid" 2>/dev/null || true
    echo "Stopped moto_server (pid $pid)" >&2
  fi
  rm -rf "$state"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) server_running && cat "$state/env.sh" || { echo "no local stack running in $state" >&2; exit 1; } ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
