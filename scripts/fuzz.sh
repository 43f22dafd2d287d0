#!/usr/bin/env bash
# Property-based fuzzing of the HTTP API with schemathesis: requests generated from
# docs/openapi.yaml (valid and invalid) against the running functions, failing on any 5xx,
# any response outside the documented statuses, schemas or headers, and the other checks.
#
#   scripts/fuzz.sh [MAX_EXAMPLES] [MAX_SECONDS]     (defaults 50 and 120)
#
# Needs the environment of a running stack (LOCAL_API_URL, JWT_SECRET_ARN, AWS_*): `make test`
# calls it with small bounds, `make fuzz` with large ones. Each run has a random seed, which
# schemathesis prints; pass SCHEMATHESIS_SEED to repeat one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
examples="${1:-50}"
max_time="${2:-120}"
: "${LOCAL_API_URL:?run this through make test or make fuzz (it needs a running stack)}"
# A user of its own: the fuzzer's connects count against its own rate limit only.
token="$(.venv/bin/python scripts/dev_token.py "fuzz-$(.venv/bin/python -c 'import uuid; print(uuid.uuid4().hex)')" 3600)"
seed=()
[[ -n "${SCHEMATHESIS_SEED:-}" ]] && seed=(--seed "$SCHEMATHESIS_SEED")
export PYTHONPATH="$root/scripts${PYTHONPATH:+:$PYTHONPATH}" SCHEMATHESIS_HOOKS=fuzz_hooks
exec .venv/bin/schemathesis --config-file docs/schemathesis.toml run docs/openapi.yaml \
  --url "$LOCAL_API_URL" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --max-examples "$examples" \
  --max-time "$max_time" \
  --request-timeout 30 \
  --no-color \
  "${seed[@]}"
