#!/usr/bin/env bash
# One HTTP stack, one TLS stack and one crypto provider in every function (#21): fails if a
# function's arm64 dependency tree holds two versions of hyper, h2, http, rustls, hyper-rustls
# or tokio-rustls (the AWS SDK's legacy client brings hyper 0.14 and rustls 0.21 back when a
# crate's default features are left on), or aws-lc-rs beside ring (the SDK's default HTTPS
# client brings aws-lc-rs; every client here is given ring), or any of the crates of the
# SDK's own HTTP client (aws-smithy-http-client, with HTTP/2 and the system's CA files read at
# start-up): the SDK is given reqwest (shared::aws_http).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
status=0
for function in functions/*/; do
  name="$(basename "$function")"
  twice="$(cargo tree -q -p "$name" --target aarch64-unknown-linux-gnu -e normal -d --depth 0 2>/dev/null \
    | grep -E '^(hyper|h2|http|rustls|hyper-rustls|tokio-rustls) v' | sort -u || true)"
  if [[ -n "$twice" ]]; then
    echo "$name: more than one version of:" >&2
    echo "$twice" | sed 's/^/  /' >&2
    status=1
  fi
  unwanted="$(cargo tree -q -p "$name" --target aarch64-unknown-linux-gnu -e normal --prefix none 2>/dev/null \
    | grep -oE '^(aws-smithy-http-client|h2|rustls-native-certs) v[^ ]+' | sort -u || true)"
  if [[ -n "$unwanted" ]]; then
    echo "$name: the SDK's own HTTP client is back: $(echo $unwanted)" >&2
    status=1
  fi
  providers="$(cargo tree -q -p "$name" --target aarch64-unknown-linux-gnu -e normal --prefix none 2>/dev/null \
    | grep -oE '^(ring|aws-lc-rs) v[^ ]+' | sort -u || true)"
  if [[ "$(printf '%s\n' "$providers" | grep -c .)" -ne 1 ]]; then
    echo "$name: one crypto provider expected, found: ${providers:-none}" >&2
    status=1
  fi
done
[[ $status -eq 0 ]] && echo "one HTTP client, one TLS stack and one crypto provider in each of: $(ls functions | tr '\n' ' ')"
exit $status
