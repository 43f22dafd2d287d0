#!/usr/bin/env bash
# `make build-<LogicalId>`, run by `sam build` (BuildMethod: makefile) for each function:
# builds every function's release arm64 bootstrap with cargo-lambda in one go (the first
# target does the work, later ones find it up to date), then copies this function's into
# SAM's $ARTIFACTS_DIR. The functions are the `Binary` names in template.yaml.
#
#   scripts/lambda-artifact.sh <binary>
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
binary="$1"
: "${ARTIFACTS_DIR:?run by sam build (make build-<LogicalId>), which sets ARTIFACTS_DIR}"
cd "$root"
scripts/venv.sh
# cargo-lambda cross-links with zig, found as `python3 -m ziglang` from the .venv.
export PATH="$root/.venv/bin:$PATH"
rustup target add aarch64-unknown-linux-gnu >&2
mapfile -t binaries < <(sed -n 's/^ *Binary: *\([a-z_-]*\) *$/\1/p' template.yaml)
args=()
for b in "${binaries[@]}"; do args+=(--bin "$b"); done
mkdir -p target/lambda
# SAM shows none of this output; it is kept in target/lambda/build.log (and shown on failure).
if ! cargo-lambda lambda build --release --arm64 "${args[@]}" > target/lambda/build.log 2>&1; then
  tail -40 target/lambda/build.log >&2
  exit 1
fi
install -m 0755 "target/lambda/$binary/bootstrap" "$ARTIFACTS_DIR/bootstrap"
# The zip as SAM uploads it, for the functions benchmark's size column.
.venv/bin/python -c 'import sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z: z.write(sys.argv[2], "bootstrap")' \
  "target/lambda/$binary/bootstrap.zip" "target/lambda/$binary/bootstrap"
