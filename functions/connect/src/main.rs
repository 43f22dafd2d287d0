use lambda_http::{Error, run, service_fn};
use shared::connect::Connect;
use shared::context::Function;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let connect = Function::<Connect>::from_env().await?;
    run(service_fn(|req| connect.handle(req))).await
}
