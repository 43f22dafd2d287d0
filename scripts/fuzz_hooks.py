"""schemathesis hooks for scripts/fuzz.sh.

cargo lambda watch answers a text-typed request body that is not UTF-8 with its own 500
before any function runs; API Gateway hands such bodies to Lambda base64-encoded instead,
and tests/tests/contract.rs checks the functions' answer to that through a real Lambda
event. So the fuzzer does not send them to the local emulator."""

import schemathesis


@schemathesis.hook
def filter_body(ctx, body):
    if isinstance(body, (bytes, bytearray)):
        try:
            bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True
