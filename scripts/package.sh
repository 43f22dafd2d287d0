#!/usr/bin/env bash
# `make package`: release arm64 zips of the five functions (what SAM deploys), built with
# cargo-lambda from .venv (which brings its own zig for cross-linking), and their sizes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/venv.sh
# cargo-lambda cross-links with zig, found as `python3 -m ziglang` from the .venv.
export PATH="$root/.venv/bin:$PATH"
rustup target add aarch64-unknown-linux-gnu >&2
functions=(connect callback accounts disconnect refresh)
args=()
for f in "${functions[@]}"; do args+=(--bin "$f"); done
.venv/bin/cargo-lambda lambda build --release --arm64 --output-format zip "${args[@]}"
echo
echo "Release arm64 packages (target/lambda/<function>/bootstrap.zip):"
for f in "${functions[@]}"; do
  zip="target/lambda/$f/bootstrap.zip"
  [[ -f "$zip" ]] || { echo "missing $zip" >&2; exit 1; }
  awk -v f="$f" -v b="$(stat -c %s "$zip")" 'BEGIN { printf "  %-11s %6.2f MB  (%d bytes)\n", f, b / 1048576, b }'
done
