use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use shared::token::Tokens;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let tokens = Tokens::from_env().await?;
    let tokens = &tokens;
    run(service_fn(
        |event: LambdaEvent<serde_json::Value>| async move {
            Ok::<_, Error>(tokens.answer(event.payload).await)
        },
    ))
    .await
}
