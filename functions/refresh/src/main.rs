use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use shared::refresh::Refresh;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let refresh = Refresh::from_env().await?;
    run(service_fn(|_: LambdaEvent<serde_json::Value>| async {
        Ok::<_, Error>(refresh.run().await)
    }))
    .await
}
