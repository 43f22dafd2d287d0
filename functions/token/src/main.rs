use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use serde_json::value::RawValue;
use shared::use_cases::token::Tokens;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::adapters::telemetry::init();
    let tokens = Tokens::from_env().await?;
    let tokens = &tokens;
    // Raw: whatever a caller sends is answered (an invalid_request at worst), never turned
    // into a function error or a tree of megabytes.
    run(service_fn(|event: LambdaEvent<Box<RawValue>>| async move {
        Ok::<_, Error>(tokens.answer(&event.payload).await)
    }))
    .await
}
