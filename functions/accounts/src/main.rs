use lambda_http::{Error, run, service_fn};
use shared::context::Function;
use shared::use_cases::accounts::Accounts;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    shared::adapters::telemetry::init();
    let accounts = Function::<Accounts>::from_env().await?;
    run(service_fn(|req| accounts.handle(req))).await
}
