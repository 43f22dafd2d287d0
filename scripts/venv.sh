#!/usr/bin/env bash
# Creates the project's .venv and installs requirements-dev.txt into it when missing or
# out of date. Prints nothing on stdout (callers capture stdout); progress goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$root/requirements-dev.txt" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "Installing local tooling into .venv (moto, cargo-lambda)..." >&2
python3 -m venv "$venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/requirements-dev.txt" >&2
echo "$want" > "$stamp"
