use lambda_http::{Error, run, service_fn};
use shared::context::Function;
use shared::use_cases::callback::Callback;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::adapters::telemetry::init();
    let callback = Function::<Callback>::from_env().await?;
    run(service_fn(|req| callback.handle(req))).await
}
