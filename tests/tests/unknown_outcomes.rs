//! Writes that fail or whose outcome is unknown after Klaviyo has answered: the refresh job's
//! and the callback's. In a test binary of their own, one test at a time: the refresh job
//! takes every due connection and pending revocation in the table, so nothing else may
//! refresh or revoke meanwhile. The functions run behind a fault proxy in front of moto (see
//! fault_matrix.rs).

use e2e::fault_proxy::{Failure, Matcher, Stage};
use e2e::lambda::{LocalLambda, Outcome};
use e2e::{
    accounts_of, callback_request, klaviyo_account, pending_revocations, refresh_tokens, setting,
    settings_page, token_for, unique,
};

/// One test at a time (see above).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn scheduled_event() -> serde_json::Value {
    serde_json::from_str(include_str!("../../events/scheduled.json")).expect("event fixture")
}

/// A refresh whose result cannot be stored after Klaviyo rotated the token: the run fails
/// (so the alarm sees it), and the new refresh token, stored nowhere, is revoked rather than
/// left live; the connection then needs re-authorisation (its stored token was rotated away).
/// A write whose answers were lost, once or every time, is recognised as stored.
#[tokio::test]
async fn a_refresh_whose_write_fails_fails_the_run_and_leaves_no_live_token_behind() {
    let _serial = SERIAL.lock().await;
    const PUT: Matcher = Matcher::AwsTarget("DynamoDB_20120810.PutItem");
    let stage = Stage::new().await;
    let refresh = stage.function("refresh").await;

    // Lost answers, once (the SDK's retry meets the landed write) or every time (the job
    // reads what is stored): the write landed, and the result counts as stored.
    for lost in [Failure::LostAnswer, Failure::LostAnswers] {
        let token = token_for(&unique("user")).await;
        let account = klaviyo_account();
        let id = e2e::connect_due(&token, &account).await;
        stage.inject(PUT, lost).await;
        let outcome = refresh.invoke(scheduled_event()).await;
        stage.clear(PUT).await;
        let Outcome::Response(summary) = outcome else {
            panic!("{lost:?}: the run succeeds: {outcome:?}");
        };
        assert!(
            summary["refreshed"].as_u64() >= Some(1),
            "{lost:?}: {summary}"
        );
        let active = refresh_tokens(&account, "active").await;
        assert_eq!(
            active.len(),
            1,
            "{lost:?}: the rotated token is stored and live"
        );
        assert_eq!(
            pending_revocations(&id).await,
            0,
            "{lost:?}: and not queued"
        );
        assert_eq!(accounts_of(&token).await[0]["status"], "active");
    }

    // The write keeps failing.
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = e2e::connect_due(&token, &account).await;
    stage.inject(PUT, Failure::ServerError).await;
    let outcome = refresh.invoke(scheduled_event()).await;
    assert!(
        matches!(&outcome, Outcome::Error(e) if e.to_string().contains("results not stored: ")
            && !e.to_string().contains("results not stored: 0,")),
        "the run fails: {outcome:?}"
    );
    assert!(
        refresh_tokens(&account, "active").await.is_empty(),
        "the unstored new refresh token was revoked"
    );
    stage.clear(PUT).await;
    expire_lease(&user, &id).await;

    // Klaviyo rotated the stored token away: the next run finds it refused and says so.
    let outcome = refresh.invoke(scheduled_event()).await;
    assert!(matches!(outcome, Outcome::Response(_)), "{outcome:?}");
    assert_eq!(accounts_of(&token).await[0]["status"], "needs_reauth");
}

/// The failed run's lease would expire in a minute; expire it now.
async fn expire_lease(user: &str, id: &str) {
    use aws_sdk_dynamodb::types::AttributeValue;
    let sdk = shared::context::aws_sdk_config().await;
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
    let _serial = SERIAL.lock().await;
    let refresh =
        LocalLambda::start("refresh", &[("AWS_PROFILE", "secrets-only".to_owned())]).await;
    let outcome = refresh.invoke(scheduled_event()).await;
    assert!(
        matches!(&outcome, Outcome::Error(e) if e.to_string().contains("steps refused by AWS: ")
            && !e.to_string().contains("steps refused by AWS: 0,")),
        "the run fails: {outcome:?}"
    );
}

/// A revocation queued for a token that is, after all, the connection's stored one (its
/// write's outcome was unknown when it was queued): the job drops the queue item and does not
/// revoke the live token.
#[tokio::test]
async fn the_job_does_not_revoke_a_queued_token_that_is_the_stored_one() {
    let _serial = SERIAL.lock().await;
    let user = unique("user");
    let token = token_for(&user).await;
    let user = shared::UserId::parse(&user).expect("a user id");
    let account = klaviyo_account();
    let id = e2e::connected_id(&token, &account).await;
    let store = e2e::environment().await.store();
    let connection = store.get_connection(&user, &id).await.expect("stored");
    let queued =
        shared::PendingRevocation::for_connection(&connection, time::OffsetDateTime::now_utc());
    store.put_pending_revocation(&queued).await.expect("queued");
    assert_eq!(pending_revocations(&id).await, 1);

    let refresh = LocalLambda::start("refresh", &[]).await;
    let outcome = refresh.invoke(scheduled_event()).await;
    assert!(matches!(outcome, Outcome::Response(_)), "{outcome:?}");
    assert_eq!(pending_revocations(&id).await, 0, "the queue item is gone");
    assert_eq!(
        refresh_tokens(&account, "active").await.len(),
        1,
        "the stored token was not revoked"
    );
}

/// A reconnect whose transaction lands but every answer is lost: the callback cannot know
/// from the write, reads what is stored, finds its own tokens and reports success; nothing it
/// stored is revoked, and the replaced token queued in that transaction is revoked by the job.
#[tokio::test]
async fn a_reconnect_whose_every_answer_is_lost_keeps_what_it_stored() {
    let _serial = SERIAL.lock().await;
    let stage = Stage::new().await;
    let callback = stage.one_step_callback().await;
    let token = token_for(&unique("user")).await;
    let account = klaviyo_account();
    let id = e2e::connected_id(&token, &account).await;
    let original = refresh_tokens(&account, "active").await;

    const TRANSACTION: Matcher = Matcher::AwsTarget("DynamoDB_20120810.TransactWriteItems");
    stage.inject(TRANSACTION, Failure::LostAnswers).await;
    let landed = callback
        .http(callback_request(&token, &account).await)
        .await;
    stage.clear(TRANSACTION).await;
    assert_eq!(landed.status, 302, "{}", landed.body);
    assert_eq!(
        landed.header("location"),
        Some(settings_page("connected=klaviyo").as_str()),
        "stored though no answer came"
    );
    let active = refresh_tokens(&account, "active").await;
    assert_eq!(
        active.len(),
        2,
        "the new token (stored) and the old (queued) are live"
    );
    assert_eq!(
        pending_revocations(&id).await,
        1,
        "the replaced token is queued"
    );

    e2e::invoke_refresh().await;
    let active = refresh_tokens(&account, "active").await;
    assert_eq!(active.len(), 1, "the job revoked the replaced token");
    assert!(!original.contains(&active[0]), "and kept the stored one");
    assert_eq!(pending_revocations(&id).await, 0);
}
