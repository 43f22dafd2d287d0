#!/usr/bin/env bash
# The host-service examples (examples/host-services/: Python with boto3, Node with the AWS SDK
# v3) against a running local stack, as `make test` runs them: a user connects a private API key,
# each example gets the credential from the token function through the local Lambda invoke
# endpoint (AWS_ENDPOINT_URL_LAMBDA, `cargo lambda watch`) and calls Klaviyo's accounts endpoint
# (the sandbox) with it; then the key is deleted in Klaviyo, a test finds out, and both examples
# report needs_reauth. Installs the Node example's dependencies from its lockfile (npm ci).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -z "${LOCAL_API_URL:-}" || -z "${KLAVIYO_SANDBOX_URL:-}" ]]; then
  eval "$(scripts/local-stack.sh env)"
fi

node_dir="$root/examples/host-services/node"
scripts/npm-ci.sh "$node_dir"

fail() { echo "host-service examples: $*" >&2; exit 1; }
suffix="$("$root/.venv/bin/python" -c 'import uuid; print(uuid.uuid4().hex[:12])')"
user="host-service-example-$suffix"
account="KHost$suffix"
key="pk_example_$suffix$suffix"
token="$(scripts/dev-token.sh "$user" 600)"
curl -sf -X POST -H 'content-type: application/json' \
  -d "{\"key\":\"$key\",\"account\":\"$account\",\"organization_name\":\"Example Org\"}" \
  "$KLAVIYO_SANDBOX_URL/sandbox/api-keys" >/dev/null || fail "the sandbox did not take the key"
id="$(curl -sf -X POST -H "Authorization: Bearer $token" -H 'content-type: application/json' \
  -d "{\"apiKey\":\"$key\"}" "$LOCAL_API_URL/api/oauth/connect/klaviyo/api-key" \
  | "$root/.venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["account"]["id"])')" \
  || fail "the key could not be connected"

# The host services' view: the token function at the local Lambda endpoint, Klaviyo's API at
# the sandbox.
export AWS_ENDPOINT_URL_LAMBDA="$LOCAL_API_URL" TOKEN_FUNCTION=token KLAVIYO_API_BASE
python_example=("$root/.venv/bin/python" "$root/examples/host-services/python/get_credential.py" "$user" "$id")
node_example=(node "$node_dir/get-credential.mjs" "$user" "$id")
errors="$(mktemp)"
trap 'rm -f "$errors"' EXIT
for example in python node; do
  declare -n command="${example}_example"
  output="$("${command[@]}" 2>"$errors")" || fail "$example: $output $(cat "$errors")"
  [[ "$output" == "$account Example Org" ]] || fail "$example printed: $output"
  echo "$example example: $output" >&2
done

# The key deleted in Klaviyo and found by a test: each example is told the user must reconnect.
curl -sf -X POST -H 'content-type: application/json' -d "{\"key\":\"$key\"}" \
  "$KLAVIYO_SANDBOX_URL/sandbox/api-keys/revoke" || fail "the sandbox did not revoke the key"
curl -sf -X POST -H "Authorization: Bearer $token" "$LOCAL_API_URL/api/oauth/accounts/$id/verify" >/dev/null \
  || fail "the test of the connection failed"
for example in python node; do
  declare -n command="${example}_example"
  if output="$("${command[@]}" 2>"$errors")"; then fail "$example succeeded for a refused key: $output"; fi
  grep -q "needs_reauth" "$errors" || fail "$example said: $output $(cat "$errors")"
done
echo "Both host-service examples got a credential, called Klaviyo with it, and heard of needs_reauth." >&2
