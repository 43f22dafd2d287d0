#!/usr/bin/env bash
# Serves the five functions with `cargo lambda watch` on 127.0.0.1:${LOCAL_API_PORT:-9000},
# routed by [workspace.metadata.lambda.watch.router] in Cargo.toml. The environment (the
# local stack's settings) is passed through to the functions. CORS is left to the functions.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
exec "$root/.venv/bin/cargo-lambda" lambda watch \
  -A 127.0.0.1 -P "${LOCAL_API_PORT:-9000}" --disable-cors "$@"
