#!/usr/bin/env bash
# Prints a JWT for USER_ID that the functions of the running local stack accept (1 hour).
#   scripts/dev-token.sh alice
# Uses the environment of the current shell if it has the stack's settings, else the
# stack in LOCAL_STACK_DIR (default .local/stack, the one `make dev` starts).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ $# -ge 1 && -n "$1" ]] || { echo "usage: $0 USER_ID [TTL_SECONDS]" >&2; exit 2; }
if [[ -z "${JWT_SECRET_ARN:-}" || -z "${AWS_ENDPOINT_URL:-}" ]]; then
  eval "$("$root/scripts/local-stack.sh" env)"
fi
exec "$root/.venv/bin/python" "$root/scripts/dev_token.py" "$@"
