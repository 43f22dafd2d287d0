use lambda_http::{Error, run, service_fn};
use shared::context::Function;
use shared::use_cases::disconnect::Disconnect;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::adapters::telemetry::init();
    let disconnect = Function::<Disconnect>::from_env().await?;
    run(service_fn(|req| disconnect.handle(req))).await
}
