use lambda_http::{Error, run, service_fn};
use shared::connect::Connect;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let connect = Connect::from_env().await?;
    run(service_fn(|req| connect.handle(req))).await
}
