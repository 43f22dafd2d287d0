use lambda_http::{Error, run, service_fn};
use shared::accounts::Accounts;
use shared::context::Function;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let accounts = Function::<Accounts>::from_env().await?;
    run(service_fn(|req| accounts.handle(req))).await
}
