//! What one AWS SDK call costs the caller (not a test): `scripts/bench-sdk-call.sh [N]`.
//!
//! A DynamoDB `GetItem` answered by a local server with a canned connection item (no moto,
//! no network), N times per variant, on the runtime the functions run on (current_thread).
//! The figure is the CPU time of the calling thread per call (user + system: the SDK, the
//! HTTP client, the kernel's socket work); the server runs on a thread of its own and is not
//! counted. Variants: the functions' configuration (`shared::context::aws_config_loader`),
//! then with one SDK setting changed at a time, the SDK's own HTTP client in place of
//! reqwest, and the same request sent by reqwest alone (the HTTP floor under the SDK).

use aws_config::stalled_stream_protection::StalledStreamProtectionConfig;
use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::types::AttributeValue;
use axum::Router;
use axum::routing::post;
use e2e::cpu_seconds;
use std::sync::LazyLock;
use std::time::Instant;

/// A stored OAuth connection as DynamoDB returns it (about 850 bytes, as measured in
/// docs/COST.md: the sealed credentials are 368 bytes).
static ITEM: LazyLock<String> = LazyLock::new(|| {
    use base64::Engine;
    let sealed = base64::engine::general_purpose::STANDARD.encode([7u8; 368]);
    serde_json::json!({"Item": {
        "pk": {"S": "user#bench-user-0001"},
        "sk": {"S": "conn#2f1d3c4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"},
        "auth_type": {"S": "oauth"},
        "status": {"S": "active"},
        "klaviyo_account_id": {"S": "AbC123"},
        "klaviyo_account_name": {"S": "Bench Store"},
        "scopes": {"L": [{"S": "accounts:read"}, {"S": "lists:read"}, {"S": "profiles:read"}]},
        "credentials": {"B": sealed},
        "version": {"N": "42"},
        "expires_at": {"S": "2026-11-27T12:00:00Z"},
        "due_at": {"S": "2026-11-27T11:45:00Z"},
        "authorized_at": {"S": "2026-11-20T09:30:00Z"},
        "updated_at": {"S": "2026-11-27T11:00:00Z"},
        "last_used_at": {"S": "2026-11-27T10:00:00Z"},
    }})
    .to_string()
});

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let url = serve(false);
    let closing = serve(true);
    println!(
        "N = {n} GetItem calls per variant against a canned local answer; CPU of the calling thread\n"
    );
    println!("| variant | CPU per call µs | wall per call µs |");
    println!("|---|---|---|");

    let functions = || shared::context::aws_config_loader();
    let reqwest = functions().load().await;
    let no_stall = functions()
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
        .load()
        .await;
    let one_attempt = functions()
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .load()
        .await;
    let hyper = functions()
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .load()
        .await;
    let no_account_ids = |b: aws_sdk_dynamodb::config::Builder| {
        b.account_id_endpoint_mode(aws_types::endpoint_config::AccountIdEndpointMode::Disabled)
    };
    let variants = [
        (
            "the functions' configuration (reqwest)",
            client(&reqwest, &url, |b| b),
        ),
        (
            "… the server closing every connection, as moto does",
            client(&reqwest, &closing, |b| b),
        ),
        (
            "… without stalled-stream protection",
            client(&no_stall, &url, |b| b),
        ),
        (
            "… without retries (for scale; not an option)",
            client(&one_attempt, &url, |b| b),
        ),
        (
            "… without account-id endpoints",
            client(&reqwest, &url, no_account_ids),
        ),
        (
            "the SDK's own HTTP client (hyper)",
            client(&hyper, &url, |b| b),
        ),
    ];
    for (variant, client) in variants {
        measure(variant, n, client).await;
    }
    floor(n, &url).await;
}

fn client(
    config: &aws_config::SdkConfig,
    url: &str,
    tune: impl FnOnce(aws_sdk_dynamodb::config::Builder) -> aws_sdk_dynamodb::config::Builder,
) -> aws_sdk_dynamodb::Client {
    let builder = aws_sdk_dynamodb::config::Builder::from(config)
        .endpoint_url(url)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "AKIDBENCHNOTAREALKEY",
            "bench-secret-not-a-real-secret",
            None,
            None,
            "bench",
        ));
    aws_sdk_dynamodb::Client::from_conf(tune(builder).build())
}

async fn measure(variant: &str, n: usize, client: aws_sdk_dynamodb::Client) {
    let call = || async {
        let output = client
            .get_item()
            .table_name("klaviyo-connect")
            .key("pk", AttributeValue::S("user#bench-user-0001".into()))
            .key("sk", AttributeValue::S("conn#2f1d3c4e".into()))
            .consistent_read(true)
            .send()
            .await
            .expect("GetItem");
        assert!(output.item.is_some_and(|item| item.len() == 14));
    };
    for _ in 0..200 {
        call().await;
    }
    let (cpu, wall) = (cpu_seconds("thread-self"), Instant::now());
    for _ in 0..n {
        call().await;
    }
    report(variant, n, cpu, wall);
}

/// The same request by reqwest alone: what HTTP costs under the SDK.
async fn floor(n: usize, url: &str) {
    let http = shared::http_client().build().expect("client");
    let body = r#"{"TableName":"klaviyo-connect","Key":{"pk":{"S":"user#bench-user-0001"},"sk":{"S":"conn#2f1d3c4e"}},"ConsistentRead":true}"#;
    let call = || async {
        let response = http
            .post(url)
            .header("content-type", "application/x-amz-json-1.0")
            .header("x-amz-target", "DynamoDB_20120810.GetItem")
            .body(body)
            .send()
            .await
            .expect("POST");
        assert_eq!(response.bytes().await.expect("body").len(), ITEM.len());
    };
    for _ in 0..200 {
        call().await;
    }
    let (cpu, wall) = (cpu_seconds("thread-self"), Instant::now());
    for _ in 0..n {
        call().await;
    }
    report(
        "reqwest alone, same request (no signing, no parsing)",
        n,
        cpu,
        wall,
    );
}

fn report(variant: &str, n: usize, cpu: f64, wall: Instant) {
    let per_call = |seconds: f64| seconds * 1e6 / n as f64;
    println!(
        "| {variant} | {:.0} | {:.0} |",
        per_call(cpu_seconds("thread-self") - cpu),
        per_call(wall.elapsed().as_secs_f64())
    );
}

/// The canned DynamoDB, on a thread and runtime of its own; with `close`, it closes each
/// connection after its answer (`Connection: close`), as moto's HTTP server does.
fn serve(close: bool) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        runtime.block_on(async move {
            let connection = if close { "close" } else { "keep-alive" };
            let app = Router::new().route(
                "/",
                post(move || async move {
                    let headers = [
                        ("content-type", "application/x-amz-json-1.0"),
                        ("connection", connection),
                    ];
                    (headers, ITEM.as_str())
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(listener, app).await.expect("serve");
        });
    });
    url
}
