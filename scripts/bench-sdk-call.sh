#!/usr/bin/env bash
# What one AWS SDK call costs the caller (not a test):  scripts/bench-sdk-call.sh [N=5000]
# A DynamoDB GetItem against a canned local answer, per SDK setting and HTTP client; prints a
# Markdown table of CPU per call (docs/PERFORMANCE.md records one). No local stack needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo bench -q -p e2e --bench sdk_call -- "${1:-5000}"
