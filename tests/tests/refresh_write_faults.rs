//! A refresh whose result cannot be stored, in a test binary of its own: the refresh job
//! takes every due connection in the table, so nothing else may refresh meanwhile. The
//! function runs behind a fault proxy in front of moto (see fault_matrix.rs).

use e2e::fault_proxy::{Failure, Fault, FaultProxy, Matcher};
use e2e::lambda::{LocalLambda, Outcome};
use e2e::{
    accounts_of, klaviyo_account, pending_revocations, refresh_tokens, sandbox_url, setting,
    token_for, unique,
};

struct Stage {
    aws: FaultProxy,
}

impl Stage {
    async fn new() -> Self {
        Self {
            aws: FaultProxy::start(&setting("AWS_ENDPOINT_URL")).await,
        }
    }

    async fn function(&self, name: &str) -> LocalLambda {
        let klaviyo = sandbox_url();
        LocalLambda::start(
            name,
            &[
                ("AWS_ENDPOINT_URL", self.aws.url()),
                ("KLAVIYO_OAUTH_BASE", klaviyo.clone()),
                ("KLAVIYO_API_BASE", format!("{klaviyo}/api")),
            ],
        )
        .await
    }

    async fn inject(&self, matcher: Matcher, failure: Failure) {
        self.aws.inject(Fault { matcher, failure }).await;
    }

    async fn clear(&self) {
        self.aws.clear().await;
    }
}

fn scheduled_event() -> serde_json::Value {
    serde_json::from_str(include_str!("../../events/scheduled.json")).expect("event fixture")
}

/// A refresh whose result cannot be stored after Klaviyo rotated the token: the run fails
/// (so the alarm sees it), and the new refresh token, stored nowhere, is revoked rather than
/// left live; the connection then needs re-authorisation (its stored token was rotated away).
/// A write whose answer was lost is recognised as stored.
#[tokio::test]
async fn a_refresh_whose_write_fails_fails_the_run_and_leaves_no_live_token_behind() {
    const PUT: Matcher = Matcher::AwsTarget("DynamoDB_20120810.PutItem");
    let stage = Stage::new().await;
    let refresh = stage.function("refresh").await;

    // Lost answer: the write landed; the retry meets it and the result counts as stored.
    let token = token_for(&unique("user")).await;
    let account = klaviyo_account();
    let id = e2e::connect_due(&token, &account).await;
    stage.inject(PUT, Failure::LostAnswer).await;
    let outcome = refresh.invoke(scheduled_event()).await;
    let Outcome::Response(summary) = outcome else {
        panic!("the run succeeds: {outcome:?}");
    };
    assert!(summary["refreshed"].as_u64() >= Some(1), "{summary}");
    stage.clear().await;
    let active = refresh_tokens(&account, "active").await;
    assert_eq!(active.len(), 1, "the rotated token is stored and live");
    assert_eq!(
        pending_revocations(&id).await,
        0,
        "and not queued for revocation"
    );
    assert_eq!(accounts_of(&token).await[0]["status"], "active");

    // The write keeps failing.
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = e2e::connect_due(&token, &account).await;
    stage.inject(PUT, Failure::ServerError).await;
    let outcome = refresh.invoke(scheduled_event()).await;
    assert!(
        matches!(&outcome, Outcome::Error(e) if e.to_string().contains("could not be stored")),
        "the run fails: {outcome:?}"
    );
    assert!(
        refresh_tokens(&account, "active").await.is_empty(),
        "the unstored new refresh token was revoked"
    );
    stage.clear().await;
    expire_lease(&user, &id).await;

    // Klaviyo rotated the stored token away: the next run finds it refused and says so.
    let outcome = refresh.invoke(scheduled_event()).await;
    assert!(matches!(outcome, Outcome::Response(_)), "{outcome:?}");
    assert_eq!(accounts_of(&token).await[0]["status"], "needs_reauth");
}

/// The failed run's lease would expire in a minute; expire it now.
async fn expire_lease(user: &str, id: &str) {
    use aws_sdk_dynamodb::types::AttributeValue;
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    aws_sdk_dynamodb::Client::new(&sdk)
        .update_item()
        .table_name(setting("TABLE_NAME"))
        .key("pk", AttributeValue::S(format!("USER#{user}")))
        .key("sk", AttributeValue::S(format!("CONN#{id}")))
        .update_expression("REMOVE lease_owner, lease_until")
        .send()
        .await
        .expect("expire the lease");
}

/// A refresh function whose policy lacks its table and key actions (it can only read its
/// secrets): the run does not quietly select nothing, it fails, so the errors alarm fires.
#[tokio::test]
async fn a_refresh_run_that_aws_refuses_fails() {
    let refresh =
        LocalLambda::start("refresh", &[("AWS_PROFILE", "secrets-only".to_owned())]).await;
    let outcome = refresh.invoke(scheduled_event()).await;
    assert!(
        matches!(&outcome, Outcome::Error(e) if e.to_string().contains("steps were refused")),
        "the run fails: {outcome:?}"
    );
}
