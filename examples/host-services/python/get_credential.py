"""A host service (Python, boto3) gets a Klaviyo credential from klaviyo-connect and calls Klaviyo.

    TOKEN_FUNCTION=<TokenFunctionArn output> python get_credential.py USER_ID CONNECTION_ID
Its AWS role needs the stack's TokenInvokePolicyArn. Prints the Klaviyo account's id and name."""
import json, os, sys, urllib.request
import boto3
from botocore.config import Config

# It may take up to 90 s (a refresh at Klaviyo's worst); no retries: the caller decides.
LAMBDA = boto3.client("lambda", config=Config(read_timeout=100, retries={"max_attempts": 1}))

def credential(user_id, connection_id):
    answer = LAMBDA.invoke(FunctionName=os.environ.get("TOKEN_FUNCTION", "token"),
                           Payload=json.dumps({"userId": user_id, "connectionId": connection_id}))
    if answer.get("FunctionError"):
        sys.exit("unavailable: the token function failed; retry shortly")
    result = json.load(answer["Payload"])
    if "error" in result:  # not_found, needs_reauth (ask the user to reconnect), unavailable (retry)
        sys.exit(f"{result['error']['code']}: {result['error']['message']}")
    return result

if __name__ == "__main__":
    header = credential(sys.argv[1], sys.argv[2])["authorization"]
    request = urllib.request.Request(
        os.environ.get("KLAVIYO_API_BASE", "https://a.klaviyo.com/api") + "/accounts/",
        headers={"Authorization": header, "revision": "2025-10-15", "Accept": "application/vnd.api+json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        account = json.load(response)["data"][0]
    print(account["id"], account["attributes"]["contact_information"]["organization_name"])
