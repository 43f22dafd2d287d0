#!/usr/bin/env bash
# `make package`: `sam build` of template.yaml, exactly what `sam deploy` ships (release arm64
# bootstraps from cargo-lambda, through the Makefile's build-<LogicalId> targets), then each
# artefact's size unzipped and zipped as SAM uploads it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/venv.sh
# sam, cargo-lambda and zig (cargo-lambda's cross-linker) all come from the .venv.
export PATH="$root/.venv/bin:$PATH"
# No telemetry and no update check: nothing is sent or fetched from the network.
export SAM_CLI_TELEMETRY=0 SAM_CLI_CHECK_FOR_UPDATES=0
started=$SECONDS
echo "sam build: one cargo-lambda build of every function (about 7-13 minutes from a cold target/ on" >&2
echo "2 cores; SAM shows no cargo output, which goes to target/lambda/build.log)." >&2
sam build
echo
echo "Built by sam build in $(( (SECONDS - started) / 60 )) m $(( (SECONDS - started) % 60 )) s (.aws-sam/build/<Function>/bootstrap):"
.venv/bin/python - <<'PY'
import io, os, zipfile
build = ".aws-sam/build"
functions = sorted(d for d in os.listdir(build) if os.path.isfile(os.path.join(build, d, "bootstrap")))
if not functions:
    raise SystemExit("sam build produced no bootstrap")
for name in functions:
    path = os.path.join(build, name, "bootstrap")
    buffer = io.BytesIO()
    # As SAM zips a function for upload (deflate, default level).
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(path, "bootstrap")
    size, zipped = os.path.getsize(path), len(buffer.getvalue())
    print(f"  {name:<20} {size / 1e6:6.2f} MB  zipped {zipped / 1e6:5.2f} MB  ({zipped} bytes)")
PY
