use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use shared::use_cases::events::StreamEvent;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::adapters::telemetry::init();
    let publisher = shared::Environment::load().await?.publisher()?;
    let publisher = &publisher;
    run(service_fn(|event: LambdaEvent<StreamEvent>| async move {
        let published = publisher.publish(&event.payload).await?;
        Ok::<_, Error>(serde_json::json!({ "published": published }))
    }))
    .await
}
