use lambda_http::{Error, run, service_fn};
use shared::callback::Callback;
use shared::context::Function;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let callback = Function::<Callback>::from_env().await?;
    run(service_fn(|req| callback.handle(req))).await
}
