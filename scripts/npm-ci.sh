#!/usr/bin/env bash
# Installs a Node project's dependencies from its lockfile (npm ci), unless its node_modules
# was installed from this very lockfile already:  scripts/npm-ci.sh DIR
set -euo pipefail
dir="$1"
stamp="$dir/node_modules/.package-lock.sha256"
want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "Installing the dependencies of $dir (npm ci)..." >&2
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
  echo "$want" > "$stamp"
fi
