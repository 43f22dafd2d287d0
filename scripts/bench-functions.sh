#!/usr/bin/env bash
# Per-function benchmark (not a test):  scripts/bench-functions.sh [N=1000]
# Builds the release binaries (the Lambda release profile, for this machine), brings up a
# local stack of its own (moto + Klaviyo sandbox), and runs tests/benches/functions.rs: for
# each function, init time, first-invocation latency, warm p50/p99 over N invocations,
# handler overhead, peak RSS, remote round trips, and the arm64 zip size from `make package`.
# Prints a Markdown table; docs/PERFORMANCE.md records one with its machine and command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
n="${1:-1000}"

scripts/venv.sh
# A port of its own for the stack's API URL, so its stream pump never feeds `make dev`'s functions.
LOCAL_API_PORT="$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export LOCAL_API_PORT
echo "Building the release binaries..." >&2
cargo build -q --release -p connect -p callback -p accounts -p disconnect -p refresh -p token >&2
echo "Building the benchmark..." >&2
cargo bench -q -p e2e --bench functions --no-run >&2 2>/dev/null || cargo bench -p e2e --bench functions --no-run >&2

export LOCAL_STACK_DIR="$root/.local/bench-functions-$$"
trap 'scripts/local-stack.sh down' EXIT
eval "$(scripts/local-stack.sh up)"
cargo bench -q -p e2e --bench functions -- "$n"
