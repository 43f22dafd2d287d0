#!/usr/bin/env bash
# What one AWS SDK call costs the caller (not a test):  scripts/bench-sdk-call.sh [N=20000]
# A DynamoDB GetItem against a canned local answer, per SDK setting and HTTP client; prints a
# Markdown table of CPU per call (docs/PERFORMANCE.md records runs). No local stack needed.
# CPU comes from /proc in clock ticks (10 ms): N = 20,000 makes a tick about 0.5 µs per call;
# small N gives coarse figures. The first run builds the bench profile (minutes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo bench -q -p e2e --bench sdk_call -- "${1:-20000}"
