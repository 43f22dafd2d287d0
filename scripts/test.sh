#!/usr/bin/env bash
# `make test`: formatting, lints, and every test, against a local stack of its own (moto with
# IAM enforced from template.yaml, the Klaviyo sandbox, the example settings page and `cargo
# lambda watch` on free loopback ports), torn down even on failure: cargo tests, a bounded
# schemathesis run, the settings-page journey in Chromium, the commands the docs show
# (scripts/doc_commands.py), and the IAM audit (every granted action used, none refused).
# Exits non-zero if anything fails.
#
#   scripts/test.sh           everything (`make test`), with a short schemathesis run
#   scripts/test.sh --fuzz    only the stack and a long schemathesis run (`make fuzz`;
#                             FUZZ_EXAMPLES per operation, default 1000, FUZZ_SECONDS, default 1200)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
fuzz_only=false
[[ "${1:-}" == "--fuzz" ]] && fuzz_only=true

step() { printf '\n==> %s\n' "$*" >&2; }

# A full run builds once: incremental caches would only take disk (several GB here).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
step "Disk before: $(df -h --output=avail . | tail -1 | tr -d ' ') free"

step "Tooling (.venv)"
scripts/venv.sh

if ! $fuzz_only; then
  step "cfn-lint template.yaml"
  .venv/bin/cfn-lint template.yaml

  step "cargo fmt --check"
  cargo fmt --all -- --check

  step "cargo clippy -D warnings"
  cargo clippy --workspace --all-targets -- -D warnings

  step "One HTTP client, one TLS stack, one crypto provider in every function (scripts/check-deps.sh)"
  scripts/check-deps.sh

  step "Build"
  cargo build --workspace --all-targets
fi

export LOCAL_STACK_DIR="$root/.local/test-$$"
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
LOCAL_API_PORT="$(free_port)"
LOCAL_FRONTEND_PORT="$(free_port)"
export LOCAL_API_PORT LOCAL_FRONTEND_PORT
watch_pid=""
cleanup() {
  status=$?
  if [[ -n "$watch_pid" ]]; then
    kill -TERM -- "-$watch_pid" 2>/dev/null || true
    wait "$watch_pid" 2>/dev/null || true
  fi
  if [[ $status -ne 0 && -f "$LOCAL_STACK_DIR/watch.log" ]]; then
    echo "---- last lines of cargo lambda watch ----" >&2
    tail -40 "$LOCAL_STACK_DIR/watch.log" >&2
  fi
  if [[ $status -ne 0 && -f "$LOCAL_STACK_DIR/moto.log" ]]; then
    # A refused AWS call looks like a 503 or a failed redirect to the tests; moto names it.
    if grep -q '^AccessDenied' "$LOCAL_STACK_DIR/moto.log"; then
      echo "---- AWS calls IAM refused (moto.log) ----" >&2
      grep '^AccessDenied' "$LOCAL_STACK_DIR/moto.log" | sort | uniq -c | sort -rn | head -20 >&2
    fi
    mkdir -p target/test-logs
    cp "$LOCAL_STACK_DIR"/{moto.log,iam-audit.jsonl,watch.log} target/test-logs/ 2>/dev/null || true
    echo "(logs kept in target/test-logs/)" >&2
  fi
  scripts/local-stack.sh down
  exit $status
}
trap cleanup EXIT INT TERM

step "Local stack"
eval "$(scripts/local-stack.sh up)"

step "cargo lambda watch on $LOCAL_API_URL"
# Everything the functions log goes here; tests/tests/log_hygiene.rs reads it.
export FUNCTIONS_LOG="$LOCAL_STACK_DIR/watch.log"
setsid scripts/watch.sh --ignore-changes > "$FUNCTIONS_LOG" 2>&1 &
watch_pid=$!
.venv/bin/python scripts/warm_up.py "$LOCAL_API_URL" 600

if $fuzz_only; then
  step "schemathesis (long run)"
  scripts/fuzz.sh "${FUZZ_EXAMPLES:-1000}" "${FUZZ_SECONDS:-1200}"
  exit 0
fi

step "cargo test --workspace"
cargo test --workspace

step "schemathesis against docs/openapi.yaml (bounded; make fuzz runs longer)"
scripts/fuzz.sh 25 90

step "The settings page in Chromium (playwright-core)"
scripts/browser-test.sh

step "docs/COST.md is what scripts/cost.py prints from the recorded benchmark run"
python3 scripts/cost.py docs/cost/2026-11-27 --check docs/COST.md

step "The host-service examples (Python, Node) get credentials from the token function"
scripts/host-examples.sh

step "The deploy check (make check-deployed) against the local stack"
.venv/bin/python scripts/check_deployed.py --api-url "$LOCAL_API_URL" --jwt-secret-arn "$JWT_SECRET_ARN" \
  --frontend-url "$FRONTEND_URL" --issuer "$JWT_ISSUER" --audience "$JWT_AUDIENCE"

step "The commands the docs show, against this stack (scripts/doc_commands.py)"
.venv/bin/python scripts/doc_commands.py

step "IAM audit: each function used every action template.yaml grants it, and was refused none"
.venv/bin/python scripts/iam_audit.py "$LOCAL_STACK_DIR/iam-audit.jsonl" --template template.yaml
step "Disk after: $(df -h --output=avail . | tail -1 | tr -d ' ') free, target $(du -sh target | cut -f1), .venv $(du -sh .venv | cut -f1)"
