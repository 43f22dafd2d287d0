#!/usr/bin/env bash
# One HTTP client, one TLS stack and one crypto provider in every function (#21): they cost
# binary size and start-up time. Fails if a function's arm64 dependency tree holds
# - two versions of hyper, h2, http, rustls, hyper-rustls or tokio-rustls (the AWS SDK's
#   legacy client brings hyper 0.14 and rustls 0.21 back when a crate's default features are
#   left on);
# - aws-lc-rs beside ring (the SDK's default HTTPS client brings aws-lc-rs);
# - a second TLS stack (native-tls, openssl);
# - HTTP/2 (h2: reqwest's default `http2` feature, or the SDK's own client) or the SDK's own
#   HTTP client (aws-smithy-http-client, which also reads the system's CA files at start-up):
#   the SDK is given reqwest (shared::aws_http), HTTP/1.1 only.
# When it fails: find what pulls the crate in with
#   cargo tree -i <crate> -p <function> --target aarch64-unknown-linux-gnu -e features
# and turn that dependency's default features off in the workspace Cargo.toml.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
status=0
for function in functions/*/; do
  name="$(basename "$function")"
  if ! tree="$(cargo tree -q -p "$name" --target aarch64-unknown-linux-gnu -e normal --prefix none)"; then
    echo "$name: cargo tree failed (its error is above)" >&2
    status=1
    continue
  fi
  twice="$(cargo tree -q -p "$name" --target aarch64-unknown-linux-gnu -e normal -d --depth 0 \
    | grep -E '^(hyper|h2|http|rustls|hyper-rustls|tokio-rustls) v' | sort -u || true)"
  if [[ -n "$twice" ]]; then
    echo "$name: more than one version of:" >&2
    echo "$twice" | sed 's/^/  /' >&2
    status=1
  fi
  unwanted="$(echo "$tree" | grep -oE '^(aws-smithy-http-client|h2|rustls-native-certs|native-tls|openssl|openssl-sys) v[^ ]+' | sort -u || true)"
  if [[ -n "$unwanted" ]]; then
    echo "$name: holds what the one HTTP client and TLS stack rule keeps out:" >&2
    echo "$unwanted" | sed 's/^/  /' >&2
    status=1
  fi
  providers="$(echo "$tree" | grep -oE '^(ring|aws-lc-rs) v[^ ]+' | sort -u || true)"
  if [[ "$(printf '%s\n' "$providers" | grep -c .)" -ne 1 ]]; then
    echo "$name: one crypto provider expected, found: $(echo ${providers:-none})" >&2
    status=1
  fi
done
[[ $status -eq 0 ]] && echo "one HTTP client, one TLS stack and one crypto provider in each of: $(ls functions | tr '\n' ' ')"
exit $status
