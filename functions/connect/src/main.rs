use lambda_http::{Error, run, service_fn};
use shared::context::Function;
use shared::use_cases::connect::Connect;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::adapters::telemetry::init();
    let connect = Function::<Connect>::from_env().await?;
    run(service_fn(|req| connect.handle(req))).await
}
