#!/usr/bin/env bash
# Serves the five functions with `cargo lambda watch` on 127.0.0.1:${LOCAL_API_PORT:-9000},
# routed by [workspace.metadata.lambda.watch.router] in Cargo.toml. The environment (the
# local stack's settings) is passed through to the functions, except its AWS credentials: each
# function runs as its own IAM user, the profile named after it in the stack's credentials file
# (`[workspace.metadata.lambda.bin.<name>.env]` in Cargo.toml), whose policy is its policy in
# template.yaml. CORS is left to the functions.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
exec env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE \
  "$root/.venv/bin/cargo-lambda" lambda watch \
  -A 127.0.0.1 -P "${LOCAL_API_PORT:-9000}" --disable-cors "$@"
