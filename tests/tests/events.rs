//! Connection lifecycle events, end to end: every write goes to the table, its stream reaches
//! the events function (scripts/stream_pump.py plays Lambda's event source mapping), and the
//! function puts the events on the local EventBridge bus, which delivers them by rule to an
//! SQS queue each test subscribes for its own user. Also: at least once when the function
//! fails (the same event id on redelivery), and nothing secret in any event.

use e2e::fault_proxy::{Failure, Matcher, Stage};
use e2e::lambda::Outcome;
use e2e::{
    accounts_of, connect_api_key, connect_due, connect_klaviyo, disconnect, due_now, inject_fault,
    invoke_refresh, issued_tokens, klaviyo_account, raw_item, register_api_key, revoke_api_key,
    set_token_lifetime, setting, token_for, unique, verify,
};
use serde_json::{Value, json};
use std::time::Duration;

/// An SQS queue that receives the events of one user, through a rule on the bus.
struct Subscription {
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    seen: Vec<Value>,
}

impl Subscription {
    async fn for_user(user: &str) -> Self {
        let sdk = shared::context::aws_sdk_config().await;
        let sqs = aws_sdk_sqs::Client::new(&sdk);
        let events = aws_sdk_eventbridge::Client::new(&sdk);
        let name = format!(
            "events-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
        let queue_url = sqs
            .create_queue()
            .queue_name(&name)
            .send()
            .await
            .expect("create a queue")
            .queue_url
            .expect("queue url");
        let queue_arn = sqs
            .get_queue_attributes()
            .queue_url(&queue_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("queue attributes")
            .attributes
            .and_then(|a| {
                a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn)
                    .cloned()
            })
            .expect("queue arn");
        let bus = setting("EVENT_BUS_NAME");
        events
            .put_rule()
            .name(&name)
            .event_bus_name(&bus)
            .event_pattern(
                json!({"source": ["klaviyo-connect"], "detail": {"userId": [user]}}).to_string(),
            )
            .send()
            .await
            .expect("a rule for the user's events");
        events
            .put_targets()
            .rule(&name)
            .event_bus_name(&bus)
            .targets(
                aws_sdk_eventbridge::types::Target::builder()
                    .id("queue")
                    .arn(queue_arn)
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .expect("the queue as the rule's target");
        Self {
            sqs,
            queue_url,
            seen: Vec::new(),
        }
    }

    /// Everything received so far, after waiting up to `wait` for `until` to hold.
    async fn collect(&mut self, wait: Duration, until: impl Fn(&[Value]) -> bool) -> &[Value] {
        let deadline = std::time::Instant::now() + wait;
        while !until(&self.seen) && std::time::Instant::now() < deadline {
            let received = self
                .sqs
                .receive_message()
                .queue_url(&self.queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .expect("receive");
            for message in received.messages() {
                let body: Value =
                    serde_json::from_str(message.body().unwrap_or("{}")).expect("an event");
                self.seen.push(body);
                if let Some(handle) = message.receipt_handle() {
                    let _ = self
                        .sqs
                        .delete_message()
                        .queue_url(&self.queue_url)
                        .receipt_handle(handle)
                        .send()
                        .await;
                }
            }
        }
        &self.seen
    }

    /// The next event of `detail_type` not yet taken (within 30 s).
    async fn next(&mut self, detail_type: &str, taken: &mut usize) -> Value {
        let start = *taken;
        let has = |events: &[Value]| {
            events[start.min(events.len())..]
                .iter()
                .any(|e| e["detail-type"] == detail_type)
        };
        let events = self.collect(Duration::from_secs(30), has).await;
        let position = events[start..]
            .iter()
            .position(|e| e["detail-type"] == detail_type)
            .unwrap_or_else(|| panic!("no `{detail_type}` event; got {events:#?}"));
        *taken = start + position + 1;
        events[start + position].clone()
    }
}

/// The refresh job refreshes every due connection, so a test that runs it while another test
/// is between making a connection due and breaking it at the sandbox would refresh that one
/// too early: the tests that run the job take turns.
static REFRESH_RUNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn detail_of(event: &Value) -> &Value {
    assert_eq!(event["source"], "klaviyo-connect", "{event}");
    &event["detail"]
}

#[tokio::test]
async fn every_transition_of_a_connection_publishes_its_event() {
    let _turn = REFRESH_RUNS.lock().await;
    let user = unique("user");
    let token = token_for(&user).await;
    let mut events = Subscription::for_user(&user).await;
    let mut taken = 0;

    // Connected through OAuth (completed from the user's session).
    let account = klaviyo_account();
    connect_klaviyo(&token, &account, Some("Main store")).await;
    let id = accounts_of(&token).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let created = events.next("Connection Created", &mut taken).await;
    let detail = detail_of(&created);
    assert_eq!(detail["userId"], user.as_str());
    assert_eq!(detail["connectionId"], id.as_str());
    assert_eq!(detail["klaviyoAccountId"], account.as_str());
    assert_eq!(detail["accountName"], "Main store");
    assert_eq!(detail["authType"], "oauth");
    assert_eq!(detail["status"], "active");
    assert!(detail["reason"].is_null());
    assert!(uuid::Uuid::try_parse(detail["eventId"].as_str().unwrap()).is_ok());
    assert!(detail["occurredAt"].as_str().unwrap().ends_with('Z'));

    // Reconnected: new credentials on the same connection.
    connect_klaviyo(&token, &account, Some("Main store")).await;
    let reauthorized = events.next("Connection Reauthorized", &mut taken).await;
    assert_eq!(detail_of(&reauthorized)["connectionId"], id.as_str());

    // Switched to a private API key.
    let key = register_api_key(&account).await;
    let (status, _) = connect_api_key(&token, &json!({"apiKey": key})).await;
    assert_eq!(status, 201);
    let switched = events.next("Connection Reauthorized", &mut taken).await;
    assert_eq!(detail_of(&switched)["authType"], "api_key");

    // The key deleted in Klaviyo: "Test connection" finds out; a new key reauthorizes.
    let (status, _) = verify(&token, &id).await;
    assert_eq!(
        status, 200,
        "a test that passes changes nothing the host app hears of"
    );
    revoke_api_key(&key).await;
    let (status, _) = verify(&token, &id).await;
    assert_eq!(status, 200);
    let refused = events.next("Connection Needs Reauth", &mut taken).await;
    assert_eq!(detail_of(&refused)["connectionId"], id.as_str());
    assert_eq!(detail_of(&refused)["reason"], "api_key_refused");
    let new_key = register_api_key(&account).await;
    let (status, _) = connect_api_key(&token, &json!({"apiKey": new_key})).await;
    assert_eq!(status, 201);
    let rekeyed = events.next("Connection Reauthorized", &mut taken).await;
    assert_eq!(detail_of(&rekeyed)["status"], "active");
    // Delivery is at least once and unordered: compare the distinct events by type.
    let mut distinct = std::collections::BTreeMap::new();
    for event in &events.seen {
        distinct.insert(
            detail_of(event)["eventId"].to_string(),
            event["detail-type"].clone(),
        );
    }
    let mut types: Vec<String> = distinct
        .values()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    types.sort();
    assert_eq!(
        types,
        [
            "Connection Created",
            "Connection Needs Reauth",
            "Connection Reauthorized",
            "Connection Reauthorized",
            "Connection Reauthorized"
        ],
        "one event per transition, none for a passing test"
    );

    // A second account whose app the user removes in Klaviyo: the refresh finds out.
    let removed = klaviyo_account();
    let removed_id = connect_due(&token, &removed).await;
    events.next("Connection Created", &mut taken).await;
    inject_fault(json!({"endpoint": "token", "account": removed, "kind": "invalid_grant"})).await;
    invoke_refresh().await;
    let needs = events.next("Connection Needs Reauth", &mut taken).await;
    let detail = detail_of(&needs);
    assert_eq!(detail["connectionId"], removed_id.as_str());
    assert_eq!(detail["status"], "needs_reauth");
    assert_eq!(detail["reason"], "refresh_refused");

    // Disconnected.
    let (status, _) = disconnect(&token, &id).await;
    assert_eq!(status, 200);
    let gone = events.next("Connection Disconnected", &mut taken).await;
    assert_eq!(detail_of(&gone)["connectionId"], id.as_str());
    assert_eq!(detail_of(&gone)["status"], "disconnected");

    // Nothing secret in any of them.
    let text = serde_json::to_string(&events.seen).unwrap();
    for account in [&account, &removed] {
        let issued = issued_tokens(account).await;
        for kind in ["access_tokens", "refresh_tokens"] {
            for t in issued[kind].as_array().unwrap() {
                let t = t["token"].as_str().unwrap();
                assert!(!text.contains(t), "a Klaviyo token in an event");
            }
        }
    }
    assert!(!text.contains(&key), "the API key in an event");
    assert!(!text.contains(&new_key), "the API key in an event");
    assert!(!text.contains(&token), "the JWT in an event");
}

/// Refresh keeps failing for transient reasons after the access token expired: Degraded;
/// the next successful refresh: Recovered.
#[tokio::test]
async fn a_connection_whose_token_expired_unrefreshed_is_degraded_until_it_recovers() {
    let _turn = REFRESH_RUNS.lock().await;
    let user = unique("user");
    let token = token_for(&user).await;
    let mut events = Subscription::for_user(&user).await;
    let mut taken = 0;
    let account = klaviyo_account();
    set_token_lifetime(&account, 1).await;
    connect_klaviyo(&token, &account, None).await;
    set_token_lifetime(&account, 3600).await;
    let id = accounts_of(&token).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    events.next("Connection Created", &mut taken).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    inject_fault(json!({"endpoint": "token", "account": account, "kind": "status", "status": 503}))
        .await;
    invoke_refresh().await;
    let degraded = events.next("Connection Degraded", &mut taken).await;
    assert_eq!(detail_of(&degraded)["connectionId"], id.as_str());
    assert_eq!(detail_of(&degraded)["status"], "active");
    assert_eq!(detail_of(&degraded)["reason"], "refresh_failing");

    // Klaviyo answers again; the retry (brought forward from its backoff) succeeds.
    e2e::clear_faults(&account).await;
    due_now(&user, &id).await;
    invoke_refresh().await;
    let recovered = events.next("Connection Recovered", &mut taken).await;
    assert_eq!(detail_of(&recovered)["connectionId"], id.as_str());
}

/// The events function fails a batch when EventBridge does not take its events (the mapping
/// then delivers the batch again); a batch delivered again gives the same event ids.
#[tokio::test]
async fn a_batch_that_fails_is_delivered_again_with_the_same_event_ids() {
    let user = unique("user");
    let token = token_for(&user).await;
    let mut events = Subscription::for_user(&user).await;
    let key = register_api_key(&klaviyo_account()).await;
    let (status, body) = connect_api_key(&token, &json!({"apiKey": key})).await;
    assert_eq!(status, 201);
    let id = body["account"]["id"].as_str().unwrap().to_owned();
    let item = raw_item(format!("USER#{user}"), &format!("CONN#{id}"))
        .await
        .expect("stored");
    // The stream record of that insert, as the mapping hands it to the function.
    let record_id = unique("record");
    let batch = json!({"Records": [{
        "eventID": record_id,
        "eventName": "INSERT",
        "eventSource": "aws:dynamodb",
        "dynamodb": {
            "ApproximateCreationDateTime": e2e::now(),
            "Keys": {"pk": {"S": format!("USER#{user}")}, "sk": {"S": format!("CONN#{id}")}},
            "NewImage": serde_json::to_value(serde_dynamo::Item::from(item)).unwrap(),
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        },
    }]});

    let stage = Stage::new().await;
    let function = stage.function("events").await;
    const PUT_EVENTS: Matcher = Matcher::AwsTarget("AWSEvents.PutEvents");
    stage.inject(PUT_EVENTS, Failure::ServerError).await;
    match function.invoke(batch.clone()).await {
        Outcome::Error(error) => assert!(error.to_string().contains("EventBridge"), "{error}"),
        Outcome::Response(answer) => panic!("the batch should fail: {answer}"),
    }
    stage.clear(PUT_EVENTS).await;
    for _ in 0..2 {
        match function.invoke(batch.clone()).await {
            Outcome::Response(answer) => assert_eq!(answer["published"], 1),
            Outcome::Error(error) => panic!("delivered again, it is published: {error}"),
        }
    }
    // Two deliveries of the record (plus the pump's own delivery of the real insert, whose
    // record id differs): the same event id twice.
    let ours = |events: &[Value]| {
        events
            .iter()
            .filter(|e| e["detail"]["eventId"].is_string())
            .map(|e| e["detail"]["eventId"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let seen = events
        .collect(Duration::from_secs(30), |events| ours(events).len() >= 3)
        .await;
    let ids = ours(seen);
    let mut counts = std::collections::HashMap::new();
    for id in &ids {
        *counts.entry(id.clone()).or_insert(0) += 1;
    }
    assert!(
        counts.values().any(|&n| n == 2),
        "the redelivered record's event id twice: {ids:?}"
    );
    assert!(function.log().contains("lifecycle_event_published"));
}

/// The mapping gives up on a batch the function keeps failing: the batch's place in the stream
/// (never its records) goes to the dead-letter queue, sent with the function's own role, and
/// scripts/redrive_events.py reads it back from the stream and delivers it: the same event id
/// as the first delivery, so consumers de-duplicate it.
#[tokio::test]
async fn a_batch_given_up_on_is_kept_in_the_dead_letter_queue_and_redriven_with_the_same_event_id()
{
    use tokio::io::AsyncBufReadExt;
    // A second mapping, from now on, whose function always fails and which gives up at once.
    let failing = axum::Router::new()
        .fallback(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down") });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, failing).await });
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let python = format!("{root}/.venv/bin/python");
    let mut pump = tokio::process::Command::new(&python)
        .arg(format!("{root}/scripts/stream_pump.py"))
        .args([
            "--template",
            &format!("{root}/template.yaml"),
            "--api-url",
            &down,
        ])
        .args(["--max-retries", "0", "--starting-position", "LATEST"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("a second stream pump");
    let mut said = tokio::io::BufReader::new(pump.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = said.next_line().await.unwrap() {
            if line.contains("pumping the table's stream") {
                return;
            }
        }
        panic!("the pump stopped before pumping");
    })
    .await
    .expect("the pump starts");
    // Its log is read to the end, so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = said.next_line().await {} });
    let user = unique("user");
    let token = token_for(&user).await;
    let mut events = Subscription::for_user(&user).await;
    let (status, _) = connect_api_key(
        &token,
        &json!({"apiKey": register_api_key(&klaviyo_account()).await}),
    )
    .await;
    assert_eq!(status, 201);
    // Published once by the stack's own mapping.
    let mut taken = 0;
    let first = events.next("Connection Created", &mut taken).await;

    // Its place in the stream, read back (once the failing mapping has given up on it): our
    // connection's insert.
    let redrive = |dry_run: bool| {
        let mut command = std::process::Command::new(&python);
        command.arg(format!("{root}/scripts/redrive_events.py"));
        if dry_run {
            command.arg("--dry-run");
        }
        let output = command.output().expect("redrive_events.py runs");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        text
    };
    let ours = format!("INSERT USER#{user} CONN#");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut listed = redrive(true);
    while !listed.contains(&ours) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        listed = redrive(true);
    }
    assert!(listed.contains(&ours), "the batch's records: {listed}");
    pump.kill().await.expect("the failing mapping stops");
    // Redriven: delivered to the events function again, published with the same event id.
    let done = redrive(false);
    assert!(done.contains("redriven "), "{done}");
    let again = events.next("Connection Created", &mut taken).await;
    assert_eq!(again["detail"]["eventId"], first["detail"]["eventId"]);
    assert!(
        redrive(true).contains("redriven 0, kept 0"),
        "the queue is empty"
    );
}
