# The two commands (see README.md). Everything they need is installed into .venv by them.
.PHONY: dev test fuzz package check-deployed

## Run the whole system locally: local AWS, the functions under cargo lambda watch.
dev:
	scripts/dev.sh

## Run every check and test against a local stack of its own.
test:
	scripts/test.sh

## Fuzz the HTTP API with schemathesis for longer (FUZZ_EXAMPLES, FUZZ_SECONDS).
fuzz:
	scripts/test.sh --fuzz

## `sam build`: the release arm64 artefacts `sam deploy` ships, and their sizes.
package:
	scripts/package.sh

## Check that a deployed stack answers (STACK=name, default klaviyo-connect; AWS credentials
## from the environment).
STACK ?= klaviyo-connect
check-deployed:
	scripts/venv.sh
	.venv/bin/python scripts/check_deployed.py --stack "$(STACK)"

# Run by `sam build` for each function (template.yaml: BuildMethod: makefile).
build-ConnectFunction:
	scripts/lambda-artifact.sh connect
build-CallbackFunction:
	scripts/lambda-artifact.sh callback
build-AccountsFunction:
	scripts/lambda-artifact.sh accounts
build-DisconnectFunction:
	scripts/lambda-artifact.sh disconnect
build-RefreshFunction:
	scripts/lambda-artifact.sh refresh
build-EventsFunction:
	scripts/lambda-artifact.sh events
build-TokenFunction:
	scripts/lambda-artifact.sh token
