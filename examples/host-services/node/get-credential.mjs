// A host service (Node, AWS SDK v3) gets a Klaviyo credential from klaviyo-connect and calls Klaviyo.
//
//   TOKEN_FUNCTION=<TokenFunctionArn output> node get-credential.mjs USER_ID CONNECTION_ID
// Its AWS role needs the stack's TokenInvokePolicyArn. Prints the Klaviyo account's id and name.
import { LambdaClient, InvokeCommand } from "@aws-sdk/client-lambda";

// It may take up to 90 s (a refresh at Klaviyo's worst); no retries: the caller decides.
const lambda = new LambdaClient({ maxAttempts: 1, requestHandler: { requestTimeout: 100_000 } });

async function credential(userId, connectionId) {
  const answer = await lambda.send(new InvokeCommand({
    FunctionName: process.env.TOKEN_FUNCTION ?? "token",
    Payload: JSON.stringify({ userId, connectionId }),
  }));
  if (answer.FunctionError) throw new Error("unavailable: the token function failed; retry shortly");
  const result = JSON.parse(Buffer.from(answer.Payload).toString());
  if (result.error) throw new Error(`${result.error.code}: ${result.error.message}`); // not_found, needs_reauth, unavailable
  return result;
}

const { authorization } = await credential(process.argv[2], process.argv[3]);
const base = process.env.KLAVIYO_API_BASE ?? "https://a.klaviyo.com/api";
const response = await fetch(`${base}/accounts/`, {
  headers: { Authorization: authorization, revision: "2025-10-15", Accept: "application/vnd.api+json" },
  signal: AbortSignal.timeout(10_000),
});
if (!response.ok) throw new Error(`Klaviyo answered ${response.status}`);
const [account] = (await response.json()).data;
console.log(account.id, account.attributes.contact_information.organization_name);
