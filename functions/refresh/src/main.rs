use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use shared::use_cases::refresh::Refresh;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::adapters::telemetry::init();
    let refresh = Refresh::from_env().await?;
    let refresh = &refresh;
    run(service_fn(|event: LambdaEvent<serde_json::Value>| {
        let deadline = event.context.deadline();
        async move { Ok::<_, Error>(refresh.run(Some(deadline)).await.into_result()?) }
    }))
    .await
}
