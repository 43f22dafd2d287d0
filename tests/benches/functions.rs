//! Per-function benchmark (not a test). Run it with `scripts/bench-functions.sh`, which
//! builds the release binaries, brings up a local stack of its own and calls this.
//!
//! For each function it starts the release binary as its own process against a local Lambda
//! Runtime API (`e2e::lambda`), with AWS and Klaviyo reached through counting proxies
//! (`e2e::fault_proxy`, no faults set), and reports:
//! - init: process start to the first poll for work, and the part of it spent outside
//!   remote calls (the secrets' fetch from Secrets Manager is the only one);
//! - the first invocation's latency, then warm p50/p99 over N invocations;
//! - handler overhead: each invocation's latency minus the time some remote call was in
//!   flight (p50), i.e. what the function itself costs;
//! - CPU time per warm invocation (user + system, of the function's process);
//! - peak RSS (`VmHWM`);
//! - remote round trips of one warm request, and how many sequential waits they make
//!   (requests in flight together count as one wait);
//! - the release arm64 zip size, when `make package` has built it.

use e2e::fault_proxy::{Exchange, FaultProxy};
use e2e::lambda::{ApiRequest, LocalLambda, Outcome};
use e2e::{claims, cpu_seconds, jwt_key, sign};
use jsonwebtoken::Algorithm;
use serde_json::Value;
use shared::{Connection, UserId};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

struct Proxies {
    aws: FaultProxy,
    klaviyo: FaultProxy,
}

impl Proxies {
    fn overrides(&self) -> Vec<(&'static str, String)> {
        let klaviyo = self.klaviyo.url();
        vec![
            ("AWS_ENDPOINT_URL", self.aws.url()),
            ("KLAVIYO_OAUTH_BASE", klaviyo.clone()),
            ("KLAVIYO_API_BASE", format!("{klaviyo}/api")),
            // Connect is driven far past a user's normal rate; the limit is not what is measured.
            ("CONNECT_RATE_LIMIT", "10000".to_owned()),
        ]
    }

    fn take(&self) -> Vec<Exchange> {
        let mut all = self.aws.take_exchanges();
        all.extend(self.klaviyo.take_exchanges());
        all.sort_by_key(|e| e.started);
        all
    }
}

/// One invocation: its latency, the time no remote call was in flight, and its remote calls.
struct Sample {
    latency: Duration,
    overhead: Duration,
    exchanges: Vec<Exchange>,
}

/// Remote calls that overlap in time are one wait; returns the number of waits and the total
/// time during which at least one call was in flight.
fn waits(exchanges: &[Exchange]) -> (usize, Duration) {
    let mut count = 0;
    let mut busy = Duration::ZERO;
    let mut current: Option<(Instant, Instant)> = None;
    for e in exchanges {
        match current {
            Some((start, end)) if e.started <= end => current = Some((start, end.max(e.finished))),
            _ => {
                if let Some((start, end)) = current {
                    busy += end - start;
                }
                count += 1;
                current = Some((e.started, e.finished));
            }
        }
    }
    if let Some((start, end)) = current {
        busy += end - start;
    }
    (count, busy)
}

async fn invoke(lambda: &LocalLambda, proxies: &Proxies, request: &ApiRequest) -> (Sample, Value) {
    proxies.take();
    let started = Instant::now();
    let outcome = lambda.invoke(request.event()).await;
    let latency = started.elapsed();
    let exchanges = proxies.take();
    let (_, busy) = waits(&exchanges);
    let value = match outcome {
        Outcome::Response(value) => value,
        Outcome::Error(error) => panic!("invocation failed: {error}"),
    };
    let sample = Sample {
        latency,
        overhead: latency.saturating_sub(busy),
        exchanges,
    };
    (sample, value)
}

struct Row {
    name: &'static str,
    init: Duration,
    /// Init minus the time a remote call was in flight.
    init_own: Duration,
    samples: Vec<Sample>,
    /// CPU time (user + system) the function's process spent per warm invocation.
    cpu_per_warm: Duration,
    rss_kb: u64,
    /// How many answers had each status code (an error is reported, not hidden).
    statuses: BTreeMap<u64, usize>,
}

fn percentile(values: &mut [Duration], p: f64) -> Duration {
    values.sort();
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[index]
}

fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse().ok())
        })
        .unwrap_or(0)
}

/// The arm64 zip `make package` built, unless it is older than the release binary measured
/// (then it may not be this code).
fn zip_mb(name: &str) -> String {
    let target = format!("{}/../target", env!("CARGO_MANIFEST_DIR"));
    let zip = std::fs::metadata(format!("{target}/lambda/{name}/bootstrap.zip"));
    let binary = std::fs::metadata(format!("{target}/release/{name}"));
    match (zip, binary) {
        (Ok(zip), Ok(binary)) if zip.modified().ok() >= binary.modified().ok() => {
            format!("{:.2}", zip.len() as f64 / 1_000_000.0)
        }
        (Ok(_), _) => "stale (make package)".into(),
        _ => "(make package)".into(),
    }
}

/// Runs `requests` through a fresh process of `name` (the first one cold).
async fn measure(
    name: &'static str,
    proxies: &Proxies,
    requests: &[ApiRequest],
) -> (Row, Vec<Value>) {
    proxies.take();
    let lambda = LocalLambda::start(name, &proxies.overrides()).await;
    let init = lambda.init_duration().await;
    let (_, init_remote) = waits(&proxies.take());
    let mut samples = Vec::with_capacity(requests.len());
    let mut answers = Vec::with_capacity(requests.len());
    let pid = lambda.pid().map(|pid| pid.to_string());
    let cpu = || pid.as_deref().map_or(0.0, cpu_seconds);
    // The CPU clock starts once the first (cold) invocation has answered.
    let mut warm_cpu_from = None;
    for request in requests {
        let (sample, answer) = invoke(&lambda, proxies, request).await;
        samples.push(sample);
        answers.push(answer);
        warm_cpu_from.get_or_insert_with(cpu);
    }
    let warm_cpu = cpu() - warm_cpu_from.unwrap_or_default();
    let cpu_per_warm = Duration::from_secs_f64(warm_cpu / (requests.len() - 1).max(1) as f64);
    let rss_kb = lambda.pid().map(peak_rss_kb).unwrap_or(0);
    let mut statuses = BTreeMap::new();
    for answer in &answers {
        // A scheduled run answers its summary, the token function a credential or an error:
        // not HTTP responses.
        let status = answer["statusCode"]
            .as_u64()
            .unwrap_or(if answer.get("error").is_some() {
                500
            } else {
                200
            });
        *statuses.entry(status).or_default() += 1;
    }
    (
        Row {
            name,
            init,
            init_own: init.saturating_sub(init_remote),
            samples,
            cpu_per_warm,
            rss_kb,
            statuses,
        },
        answers,
    )
}

fn status_of(answer: &Value) -> u64 {
    answer["statusCode"].as_u64().unwrap_or(0)
}

fn print(rows: &[Row]) {
    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
    println!(
        "| function | init ms | init own ms | first ms | warm p50 ms | warm p99 ms | overhead p50 ms | CPU per warm request ms | peak RSS MB | round trips of a warm request | sequential waits | arm64 zip MB | answers |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let first = row.samples[0].latency;
        let warm = &row.samples[1..];
        let mut latencies: Vec<Duration> = warm.iter().map(|s| s.latency).collect();
        let mut overheads: Vec<Duration> = warm.iter().map(|s| s.overhead).collect();
        // The round trips of the median-latency warm request.
        let typical = &warm[warm.len() / 2];
        let mut calls: BTreeMap<String, usize> = BTreeMap::new();
        for e in &typical.exchanges {
            let what = e.what.rsplit('.').next().unwrap_or(&e.what).to_owned();
            *calls.entry(what).or_default() += 1;
        }
        let calls: Vec<String> = calls
            .into_iter()
            .map(|(what, n)| {
                if n == 1 {
                    what
                } else {
                    format!("{what} ×{n}")
                }
            })
            .collect();
        let (sequential, _) = waits(&typical.exchanges);
        let answers: Vec<String> = row
            .statuses
            .iter()
            .map(|(status, n)| format!("{n}× {status}"))
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} |",
            row.name,
            ms(row.init),
            ms(row.init_own),
            ms(first),
            ms(percentile(&mut latencies, 0.5)),
            ms(percentile(&mut latencies, 0.99)),
            ms(percentile(&mut overheads, 0.5)),
            ms(row.cpu_per_warm),
            row.rss_kb as f64 / 1024.0,
            calls.join(", "),
            sequential,
            if row.name.starts_with("floor") {
                "–".to_owned()
            } else {
                zip_mb(row.name.split([',', ':']).next().unwrap_or(row.name))
            },
            answers.join(", "),
        );
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let proxies = Proxies {
        aws: FaultProxy::start(&e2e::setting("AWS_ENDPOINT_URL")).await,
        klaviyo: FaultProxy::start(&e2e::sandbox_url()).await,
    };
    let key = jwt_key().await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let users: Vec<String> = (0..=n).map(|i| format!("bench-{run}-{i}")).collect();
    let tokens: Vec<String> = users
        .iter()
        .map(|u| sign(Algorithm::HS256, &key, &claims(u)))
        .collect();
    let mut rows = Vec::new();

    // connect: one OAuth start per user; the authorize URLs feed the callback.
    let requests: Vec<ApiRequest> = tokens
        .iter()
        .map(|t| ApiRequest::new("GET", "/api/oauth/connect/klaviyo?accountName=Bench").bearer(t))
        .collect();
    let (row, answers) = measure("connect", &proxies, &requests).await;
    rows.push(row);

    // callback: each user approves at the sandbox for a Klaviyo account of their own.
    let http = shared::http_client()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut callbacks = Vec::with_capacity(answers.len());
    let mut accounts = Vec::with_capacity(answers.len());
    // (user, token) of each flow that started, in the order of `accounts`.
    let mut started = Vec::with_capacity(answers.len());
    for (i, answer) in answers.iter().enumerate() {
        // A start the emulator was too slow for (its answers column counts them) has no flow
        // to complete.
        if status_of(answer) != 200 {
            continue;
        }
        let body: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
        let mut url = url::Url::parse(body["authUrl"].as_str().unwrap()).unwrap();
        let account = format!("B{}{i}", &run[..8]);
        url.query_pairs_mut()
            .append_pair("sandbox_account", &account)
            .append_pair("sandbox_decision", "approve");
        let response = http.get(url).send().await.expect("sandbox authorize");
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let callback = url::Url::parse(&location).unwrap();
        callbacks.push(ApiRequest::new(
            "GET",
            &format!("{}?{}", callback.path(), callback.query().unwrap_or("")),
        ));
        accounts.push(account);
        started.push((&users[i], &tokens[i]));
    }
    let (row, answers) = measure("callback", &proxies, &callbacks).await;
    let failed = answers
        .iter()
        .filter(|a| {
            !a["headers"]["location"]
                .as_str()
                .unwrap_or_default()
                .contains("connected=klaviyo")
        })
        .count();
    if failed > 0 {
        eprintln!("callback: {failed} flows did not connect");
    }
    rows.push(row);

    // complete: each user's page completes the parked result with the user's session (the
    // callback connects nobody by itself), which makes the connections measured below.
    let completes: Vec<ApiRequest> = answers
        .iter()
        .zip(&started)
        .filter_map(|(answer, (_, token))| {
            let location = answer["headers"]["location"].as_str()?;
            let address = url::Url::parse(location).ok()?;
            let handle = address
                .query_pairs()
                .find(|(name, _)| name == "completion")?
                .1
                .into_owned();
            Some(
                ApiRequest::new("POST", "/api/oauth/connect/klaviyo/complete")
                    .bearer(token)
                    .json(&serde_json::json!({ "completion": handle })),
            )
        })
        .collect();
    let (mut row, _) = measure("connect", &proxies, &completes).await;
    row.name = "connect: complete";
    rows.push(row);

    // accounts: the same user's list, again and again.
    let list: Vec<ApiRequest> = (0..=n)
        .map(|_| ApiRequest::new("GET", "/api/oauth/accounts").bearer(&tokens[0]))
        .collect();
    let (row, _) = measure("accounts", &proxies, &list).await;
    rows.push(row);

    // The floor: a request the accounts function refuses before any remote call (no token),
    // so its latency is the Runtime API exchange, the event's parsing, a log line and the
    // error response: what every invocation pays before the handler's own work.
    let refused: Vec<ApiRequest> = (0..=n)
        .map(|_| ApiRequest::new("GET", "/api/oauth/accounts"))
        .collect();
    let (mut row, _) = measure("accounts", &proxies, &refused).await;
    row.name = "floor: accounts, 401";
    rows.push(row);

    // token: a host service asking for one connection again and again (after the first, a warm
    // container hands out what it opened: the target is one read and no KMS call), then for a
    // different connection each time (each opened once: a read and a KMS call).
    let connection_of = |user: &str, account: &str| {
        serde_json::json!({
            "userId": user,
            "connectionId": Connection::id_for(&UserId::parse(user).unwrap(), account),
        })
    };
    let (first_user, _) = started[0];
    let same: Vec<ApiRequest> = (0..=n)
        .map(|_| ApiRequest::raw(connection_of(first_user, &accounts[0])))
        .collect();
    let (mut row, _) = measure("token", &proxies, &same).await;
    row.name = "token, one connection (kept)";
    rows.push(row);
    let each: Vec<ApiRequest> = started
        .iter()
        .zip(&accounts)
        .map(|((user, _), account)| ApiRequest::raw(connection_of(user, account)))
        .collect();
    let (mut row, _) = measure("token", &proxies, &each).await;
    row.name = "token, a new connection each time";
    rows.push(row);

    // disconnect: every connection made above (each revoked at the sandbox).
    let deletes: Vec<ApiRequest> = started
        .iter()
        .zip(&accounts)
        .map(|((user, token), account)| {
            let id = Connection::id_for(&UserId::parse(user).unwrap(), account);
            ApiRequest::new("DELETE", &format!("/api/oauth/accounts/{id}"))
                .bearer(token)
                .path_parameter("accountId", &id)
        })
        .collect();
    let (row, _) = measure("disconnect", &proxies, &deletes).await;
    rows.push(row);

    // refresh: the scheduled run with nothing due (its own throughput is bench-refresh.sh's).
    let event: Value =
        serde_json::from_str(include_str!("../../events/scheduled.json")).expect("event");
    let runs = (n / 10).max(10);
    let scheduled: Vec<ApiRequest> = (0..=runs).map(|_| ApiRequest::raw(event.clone())).collect();
    let (row, _) = measure("refresh", &proxies, &scheduled).await;
    rows.push(row);

    println!(
        "machine: {} cores, {}; N = {n} warm invocations per HTTP function ({runs} for refresh)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned()))
            .unwrap_or_default()
    );
    print(&rows);
}
