//! Refresh throughput benchmark (not a test). Run it with `scripts/bench-refresh.sh`, which
//! brings up a local stack of its own and calls the three steps below as separate
//! processes, so the `run` step's peak memory is the refresh job's alone.
//!
//! - `seed N`     N OAuth connections due for refresh, with real tokens minted by the sandbox
//! - `run MS`     the refresh job (the library the `refresh` function runs) over everything
//!   due, with MS of added latency on every Klaviyo token call, in a child process (`job`)
//!   whose AWS endpoint is a counting proxy: prints connections/second, the job's CPU per
//!   connection, peak RSS, and the AWS calls per refreshed connection. Concurrency comes from
//!   `REFRESH_CONCURRENCY`, as in the function.
//! - `sizes`      the DynamoDB size of refreshed connection items and of their index entries,
//!   from which write units follow (DynamoDB's item size rules)
//! - `floor`      the emulators' own round-trip times, to read the figures against
//!
//! With `COST_OUT=<prefix>`, `run` and `sizes` also write `<prefix>.calls.json` and
//! `<prefix>.items.json`, which `scripts/cost.py` turns into the cost model (docs/COST.md).

use aws_sdk_dynamodb::types::AttributeValue;
use e2e::cpu_seconds;
use e2e::fault_proxy::FaultProxy;
use futures::StreamExt;
use serde_json::{Value, json};
use shared::{
    AuthType, Connection, ConnectionStatus, Credentials, Environment, Purpose, Secret, UserId,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};
use time::OffsetDateTime;

// The runtime the refresh function runs on (its main), so the CPU figures are its own.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let number =
        |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    match args.first().map(String::as_str) {
        Some("seed") => seed(number(1, 10_000) as usize).await,
        Some("run") => run(number(1, 50)).await,
        Some("job") => job(number(1, 50)).await,
        Some("sizes") => sizes().await,
        Some("floor") => floor().await,
        _ => eprintln!(
            "usage: refresh (seed N | run LATENCY_MS | sizes | floor); see scripts/bench-refresh.sh"
        ),
    }
}

fn sandbox() -> String {
    std::env::var("KLAVIYO_SANDBOX_URL").expect("run through scripts/bench-refresh.sh")
}

async fn seed(n: usize) {
    let started = Instant::now();
    let env = Environment::load().await.expect("local stack environment");
    let (store, sealer) = (env.store(), env.sealer());
    let http = shared::http_client().build().expect("HTTP client");
    let account = format!("BENCH{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut pairs: Vec<Value> = Vec::with_capacity(n);
    while pairs.len() < n {
        let count = (n - pairs.len()).min(5_000);
        let minted: Vec<Value> = http
            .post(format!("{}/sandbox/accounts/{account}/tokens", sandbox()))
            .json(&json!({"count": count}))
            .send()
            .await
            .expect("sandbox")
            .json()
            .await
            .expect("minted tokens");
        pairs.extend(minted);
    }
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("whole seconds");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let seeded = futures::stream::iter(pairs.into_iter().enumerate())
        .map(|(i, pair)| {
            let (store, sealer, account, run, scopes) =
                (&store, &sealer, &account, &run, &env.config.klaviyo.scopes);
            async move {
                let user = UserId::parse(&format!("bench-{run}-{i}")).expect("user id");
                let id = Connection::id_for(&user, account);
                let key = sealer
                    .data_key(user.as_str(), Purpose::OAuthTokens)
                    .await
                    .expect("data key");
                let credentials = Credentials::OAuth {
                    access_token: Secret::new(
                        pair["access_token"].as_str().expect("access").to_owned(),
                    ),
                    refresh_token: Secret::new(
                        pair["refresh_token"].as_str().expect("refresh").to_owned(),
                    ),
                };
                let sealed = credentials.seal(&key, user.as_str(), &id).expect("seal");
                let connection = Connection {
                    id,
                    user_id: user,
                    account_name: "Bench".into(),
                    klaviyo_account_id: account.clone(),
                    klaviyo_account_name: "Bench Org".into(),
                    auth_type: AuthType::OAuth,
                    status: ConnectionStatus::Active,
                    // As a connection in use carries them: the default scopes, a recorded use
                    // and a verification (the item's size is what a refresh pays for).
                    scopes: scopes.clone(),
                    connected_at: now,
                    updated_at: now,
                    last_refreshed_at: None,
                    access_token_expires_at: Some(now + time::Duration::minutes(10)),
                    refresh_due_at: Some(now - time::Duration::seconds(1)),
                    refresh_failures: 0,
                    authorized_at: now,
                    status_reason: None,
                    degraded: false,
                    last_verified_at: Some(now),
                    last_used_at: Some(now - time::Duration::hours(1)),
                    credentials: sealed,
                    version: 0,
                };
                store
                    .upsert_connection(&connection)
                    .await
                    .expect("seed write");
            }
        })
        .buffer_unordered(32)
        .count()
        .await;
    println!(
        "seeded {seeded} due connections (Klaviyo account {account}) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

async fn set_latency(ms: u64) {
    let http = shared::http_client().build().expect("HTTP client");
    http.delete(format!("{}/sandbox/faults", sandbox()))
        .send()
        .await
        .expect("sandbox");
    if ms > 0 {
        let fault = json!({"endpoint": "token", "kind": "latency", "ms": ms});
        let response = http
            .post(format!("{}/sandbox/faults", sandbox()))
            .json(&fault)
            .send()
            .await
            .expect("sandbox");
        assert_eq!(response.status(), 201);
    }
}

/// Runs the job in a child process whose AWS endpoint is a counting proxy in front of the
/// stack's: the child's CPU and memory are the job's alone, and every AWS call it makes is
/// counted here.
async fn run(latency_ms: u64) {
    let upstream = std::env::var("AWS_ENDPOINT_URL").expect("run through scripts/bench-refresh.sh");
    let proxy = FaultProxy::start(&upstream).await;
    let output = tokio::process::Command::new(std::env::current_exe().expect("this benchmark"))
        .args(["job", &latency_ms.to_string()])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .expect("the job process");
    assert!(output.status.success(), "the job failed");
    let mut summary = Value::Null;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        match line.strip_prefix("SUMMARY ") {
            Some(json) => summary = serde_json::from_str(json).expect("the job's summary"),
            None => println!("{line}"),
        }
    }
    let refreshed = summary["refreshed"].as_u64().unwrap_or(0).max(1) as f64;
    let mut calls: BTreeMap<String, u64> = BTreeMap::new();
    for exchange in proxy.take_exchanges() {
        *calls.entry(exchange.what).or_default() += 1;
    }
    let per: BTreeMap<String, f64> = calls
        .iter()
        .map(|(what, n)| (what.clone(), *n as f64 / refreshed))
        .collect();
    println!(
        "AWS calls per refreshed connection: {}",
        per.iter()
            .map(|(what, n)| format!("{what} {n:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Ok(prefix) = std::env::var("COST_OUT") {
        let record = json!({"job": summary, "calls": calls, "calls_per_refresh": per});
        std::fs::write(format!("{prefix}.calls.json"), record.to_string()).expect("COST_OUT");
    }
}

/// The job itself (the child of `run`).
async fn job(latency_ms: u64) {
    set_latency(latency_ms).await;
    let env = Environment::load().await.expect("local stack environment");
    let klaviyo = env.klaviyo().await.expect("Klaviyo client");
    let concurrency = env.config.refresh_concurrency;
    let job = shared::use_cases::refresh::Refresh::new(&env, klaviyo);
    let rss_before = memory("VmRSS");
    let moto = moto_pid();
    let (job_cpu_before, moto_cpu_before) = (cpu_seconds("self"), cpu_seconds(&moto));
    let started = Instant::now();
    // A generous deadline: the benchmark measures throughput, not the budget cut-off.
    let summary = job
        .run(Some(SystemTime::now() + Duration::from_secs(3600)))
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let job_cpu = cpu_seconds("self") - job_cpu_before;
    let moto_cpu = cpu_seconds(&moto) - moto_cpu_before;
    set_latency(0).await;
    println!(
        "refreshed {} of {} selected ({} failed, {} skipped_locked) in {seconds:.2} s: {:.0} connections/s \
         | concurrency {concurrency}, Klaviyo latency {latency_ms} ms | RSS before {:.1} MB, peak {:.1} MB",
        summary.refreshed,
        summary.selected,
        summary.failed,
        summary.skipped_locked,
        summary.refreshed as f64 / seconds,
        rss_before / 1024.0,
        memory("VmHWM") / 1024.0,
    );
    // Where the time went: CPU per refreshed connection in this job and in moto (one
    // process, so one core at most), and what each alone would allow.
    let per = |cpu: f64| cpu * 1e3 / summary.refreshed.max(1) as f64;
    println!(
        "CPU per connection: job {:.2} ms ({:.0}% of one core), moto {:.2} ms ({:.0}% of one core) \
         | ceilings: job {:.0}/s per core, moto {:.0}/s",
        per(job_cpu),
        job_cpu * 100.0 / seconds,
        per(moto_cpu),
        moto_cpu * 100.0 / seconds,
        1e3 / per(job_cpu),
        1e3 / per(moto_cpu),
    );
    let summary = json!({
        "refreshed": summary.refreshed,
        "selected": summary.selected,
        "failed": summary.failed,
        "seconds": seconds,
        "job_cpu_ms_per_refresh": per(job_cpu),
        "concurrency": concurrency,
        "latency_ms": latency_ms,
        "peak_rss_mb": memory("VmHWM") / 1024.0,
    });
    println!("SUMMARY {summary}");
}

/// DynamoDB's size of an attribute value (its item size rules: strings and binaries by
/// length, numbers by significant digits, lists and maps 3 bytes plus 1 per element).
fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => {
            let digits = n.trim_start_matches('-').replace('.', "");
            let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
            significant.div_ceil(2) + 1
        }
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(items) => items.iter().map(String::len).sum(),
        AttributeValue::L(items) => 3 + items.iter().map(|v| value_size(v) + 1).sum::<usize>(),
        AttributeValue::M(map) => {
            3 + map
                .iter()
                .map(|(k, v)| k.len() + value_size(v) + 1)
                .sum::<usize>()
        }
        _ => 0,
    }
}

fn item_size(item: &std::collections::HashMap<String, AttributeValue>) -> usize {
    item.iter().map(|(k, v)| k.len() + value_size(v)).sum()
}

/// Sizes of refreshed connection items (found through the due index: due again within two
/// hours) and of their entries in the keys-only due index (its keys, the table's keys and
/// 100 bytes of overhead, by DynamoDB's rules).
async fn sizes() {
    let env = Environment::load().await.expect("local stack environment");
    let sdk = shared::context::aws_sdk_config().await;
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    let table = env.config.table_name.clone();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let mut items = Vec::new();
    for bucket in 0..shared::adapters::store::DUE_BUCKETS {
        let page = client
            .query()
            .table_name(&table)
            .index_name(shared::adapters::store::DUE_INDEX)
            .key_condition_expression("due_bucket = :b AND due_at BETWEEN :from AND :to")
            .expression_attribute_values(":b", AttributeValue::S(format!("refresh#{bucket:02}")))
            .expression_attribute_values(":from", AttributeValue::N(now.to_string()))
            .expression_attribute_values(":to", AttributeValue::N((now + 7200).to_string()))
            .limit(10)
            .send()
            .await
            .expect("due index");
        for key in page.items() {
            let item = client
                .get_item()
                .table_name(&table)
                .key("pk", key["pk"].clone())
                .key("sk", key["sk"].clone())
                .consistent_read(true)
                .send()
                .await
                .expect("item");
            if let Some(item) = item.item().filter(|i| i.contains_key("last_refreshed_at")) {
                items.push(item.clone());
            }
        }
    }
    assert!(
        !items.is_empty(),
        "no refreshed connection found: run `run` first"
    );
    let sizes: Vec<usize> = items.iter().map(item_size).collect();
    let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    let max = *sizes.iter().max().expect("sizes");
    let blob = items
        .iter()
        .filter_map(|i| i.get("credentials").map(value_size))
        .max()
        .unwrap_or(0);
    let index_entry = items
        .iter()
        .map(|i| {
            ["pk", "sk", "due_bucket", "due_at"]
                .iter()
                .map(|k| k.len() + i.get(*k).map_or(0, value_size))
                .sum::<usize>()
                + 100
        })
        .max()
        .unwrap_or(0);
    // The KMS ciphertext of a data key, as this stack's KMS makes it (AWS's is 184 bytes).
    let local_kms_blob = aws_sdk_kms::Client::new(&sdk)
        .generate_data_key()
        .key_id(&env.config.kms_key_id)
        .number_of_bytes(32)
        .encryption_context("purpose", "bench-sizes")
        .send()
        .await
        .expect("data key")
        .ciphertext_blob()
        .map_or(0, |b| b.as_ref().len());
    println!(
        "connection item after a refresh: mean {mean:.0} bytes, max {max} (sealed credentials {blob}; a data key's KMS ciphertext here {local_kms_blob} bytes) | due-index entry {index_entry} bytes | {} items",
        items.len()
    );
    if let Ok(prefix) = std::env::var("COST_OUT") {
        let record = json!({
            "item_bytes_mean": mean,
            "item_bytes_max": max,
            "sealed_credentials_bytes": blob,
            "local_kms_ciphertext_bytes": local_kms_blob,
            "index_entry_bytes": index_entry,
            "items": items.len(),
        });
        std::fs::write(format!("{prefix}.items.json"), record.to_string()).expect("COST_OUT");
    }
}

/// The moto server of the benchmark's stack (its pid file in `LOCAL_STACK_DIR`).
fn moto_pid() -> String {
    let dir = std::env::var("LOCAL_STACK_DIR").expect("run through scripts/bench-refresh.sh");
    std::fs::read_to_string(format!("{dir}/moto.pid"))
        .expect("moto.pid")
        .trim()
        .to_owned()
}

/// A `/proc/self/status` figure in kB.
fn memory(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

/// Sequential round trips to each emulator: what one refresh costs before any of our work.
async fn floor() {
    const ROUNDS: u32 = 200;
    const GET_ROUNDS: u32 = 1000;
    let env = Environment::load().await.expect("local stack environment");
    let (store, sealer) = (env.store(), env.sealer());
    let user = UserId::parse("bench-floor").expect("user id");
    let moto = moto_pid();
    let (own_before, moto_before) = (cpu_seconds("self"), cpu_seconds(&moto));
    let started = Instant::now();
    for _ in 0..GET_ROUNDS {
        let _ = store.get_connection(&user, "none").await;
    }
    let get = started.elapsed() / GET_ROUNDS;
    // CPU per GetItem on each side (clock ticks are 10 ms, hence the larger sample).
    let per_get = |seconds: f64| seconds * 1e3 / f64::from(GET_ROUNDS);
    let own_get = per_get(cpu_seconds("self") - own_before);
    let moto_get = per_get(cpu_seconds(&moto) - moto_before);
    let started = Instant::now();
    for _ in 0..ROUNDS {
        sealer
            .data_key("bench-floor", Purpose::OAuthTokens)
            .await
            .expect("data key");
    }
    let kms = started.elapsed() / ROUNDS;
    let http = shared::http_client().build().expect("HTTP client");
    let started = Instant::now();
    for _ in 0..ROUNDS {
        http.get(format!("{}/sandbox/health", sandbox()))
            .send()
            .await
            .expect("sandbox");
    }
    let sandbox_rtt = started.elapsed() / ROUNDS;
    println!(
        "emulator floor (sequential, mean of {ROUNDS}): DynamoDB GetItem {:.2} ms (CPU: moto {moto_get:.2} ms, this client {own_get:.2} ms; mean of {GET_ROUNDS}) | KMS GenerateDataKey {:.2} ms | sandbox HTTP {:.2} ms",
        get.as_secs_f64() * 1e3,
        kms.as_secs_f64() * 1e3,
        sandbox_rtt.as_secs_f64() * 1e3,
    );
}
