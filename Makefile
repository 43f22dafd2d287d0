# The two commands (see README.md). Everything they need is installed into .venv by them.
.PHONY: dev test fuzz package

## Run the whole system locally: local AWS, the functions under cargo lambda watch.
dev:
	scripts/dev.sh

## Run every check and test against a local stack of its own.
test:
	scripts/test.sh

## Fuzz the HTTP API with schemathesis for longer (FUZZ_EXAMPLES, FUZZ_SECONDS).
fuzz:
	scripts/test.sh --fuzz

## Build the release arm64 zips SAM deploys and print their sizes.
package:
	scripts/package.sh
