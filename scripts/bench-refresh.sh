#!/usr/bin/env bash
# Refresh throughput benchmark (not a test):
#   scripts/bench-refresh.sh [N=10000] [LATENCY_MS=50] [CONCURRENCY=64] [N2 ...]
# Brings up a local stack of its own (moto + Klaviyo sandbox), prints the emulators' floor,
# then for each N: seeds N connections due for refresh and runs the refresh job over them
# with LATENCY_MS added to every Klaviyo token call. Prints connections/second, the job's CPU
# per connection, peak RSS, the AWS calls per refreshed connection and the size of what each
# refresh writes. With COST_OUT=<prefix> it also writes <prefix>.calls.json and
# <prefix>.items.json for scripts/cost.py (docs/COST.md).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
latency="${2:-50}"
export REFRESH_CONCURRENCY="${3:-64}"
sizes=("${1:-10000}" "${@:4}")

scripts/venv.sh
# A port of its own for the stack's API URL, so its stream pump never feeds `make dev`'s functions.
LOCAL_API_PORT="$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export LOCAL_API_PORT
export LOCAL_STACK_DIR="$root/.local/bench-$$"
trap 'scripts/local-stack.sh down' EXIT
eval "$(scripts/local-stack.sh up)"

echo "Building the benchmark (bench profile)..." >&2
cargo bench -p e2e --bench refresh --no-run 2>&1 | tail -1 >&2
bench() { cargo bench -q -p e2e --bench refresh -- "$@" 2>/dev/null; }
# The job itself runs as the refresh function's IAM user (its policy from template.yaml), as
# the deployed function does; seeding runs as the stack's admin.
bench_as_refresh() {
  env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY AWS_PROFILE=refresh \
    cargo bench -q -p e2e --bench refresh -- "$@" 2>/dev/null
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
bench floor
for n in "${sizes[@]}"; do
  bench seed "$n"
  bench_as_refresh run "$latency"
  bench sizes
done
