//! A loopback HTTP proxy that forwards everything to one upstream (moto or the Klaviyo
//! sandbox) unless a fault is set, in which case matching requests fail the way the real
//! service fails: they hang, get a 5xx, get throttled, get a body that is not what the
//! protocol promises, or find the port closed. A function started with its endpoint pointed
//! here (see `lambda.rs`) meets the fault through its real SDK or HTTP client; clearing the
//! fault lets the same process retry.

use crate::lambda::LocalLambda;
use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How a matching request fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer (longer than any client timeout).
    Timeout,
    /// A 5xx: AWS `InternalServerError` (500), Klaviyo 503.
    ServerError,
    /// Throttling: AWS `ThrottlingException` (HTTP 400, how AWS says it), Klaviyo 429 with
    /// `Retry-After`.
    Throttled,
    /// 200 with a body that is not what the protocol promises.
    Malformed,
    /// Nothing listens on the port.
    Refused,
    /// Once: the request reaches the upstream and takes effect, but its answer is lost (a
    /// 5xx comes back instead), so the client's retry meets its own applied request. Not
    /// in `ALL`: it is a property of idempotency, not a failure to survive.
    LostAnswer,
    /// Every time: each matching request takes effect and its answer is lost, so the client's
    /// retries run out and it cannot tell whether its write landed.
    LostAnswers,
}

impl Failure {
    pub const ALL: [Failure; 5] = [
        Failure::Timeout,
        Failure::ServerError,
        Failure::Throttled,
        Failure::Malformed,
        Failure::Refused,
    ];
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy)]
pub enum Matcher {
    /// AWS JSON protocols: `x-amz-target` starts with this (`DynamoDB_20120810.`,
    /// `TrentService.GenerateDataKey`, `secretsmanager.`).
    AwsTarget(&'static str),
    /// Plain HTTP: the path starts with this (`/oauth/token`, `/api/accounts`).
    Path(&'static str),
}

impl Matcher {
    fn matches(&self, request: &Request) -> bool {
        match self {
            Matcher::AwsTarget(prefix) => request
                .headers()
                .get("x-amz-target")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|target| target.starts_with(prefix)),
            Matcher::Path(prefix) => request.uri().path().starts_with(prefix),
        }
    }

    fn is_aws(&self) -> bool {
        matches!(self, Matcher::AwsTarget(_))
    }
}

/// One request the proxy forwarded: what it was (`x-amz-target`, or the path) and when it
/// was in flight. Benchmarks count round trips and time outside them from these.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub what: String,
    pub started: Instant,
    pub finished: Instant,
}

#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub matcher: Matcher,
    pub failure: Failure,
}

struct Shared {
    upstream: String,
    client: reqwest::Client,
    fault: Mutex<Option<Fault>>,
    /// Requests that matched the fault.
    hits: Mutex<usize>,
    exchanges: Mutex<Vec<Exchange>>,
}

pub struct FaultProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl FaultProxy {
    /// A proxy on a free loopback port in front of `upstream` (`http://127.0.0.1:5000`).
    pub async fn start(upstream: &str) -> Self {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: shared::http_client()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("proxy client"),
            fault: Mutex::new(None),
            hits: Mutex::new(0),
            exchanges: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let proxy = Self {
            address: listener.local_addr().expect("address"),
            shared,
            stop: Mutex::new(None),
        };
        proxy.serve(listener);
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        *self.stop.lock().unwrap() = Some(stop);
        let app = Router::new()
            .fallback(forward)
            .with_state(self.shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
    }

    /// From now on, requests matching `fault` fail. `Refused` closes the port.
    pub async fn inject(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = Some(fault);
        if fault.failure == Failure::Refused {
            if let Some(stop) = self.stop.lock().unwrap().take() {
                let _ = stop.send(());
            }
            // The port is closed once the server has stopped accepting.
            for _ in 0..200 {
                if tokio::net::TcpStream::connect(self.address).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the fault proxy kept its port open");
        }
    }

    /// Back to forwarding everything (re-opening the port after `Refused`).
    pub async fn clear(&self) {
        let refused = matches!(
            self.shared.fault.lock().unwrap().take(),
            Some(Fault {
                failure: Failure::Refused,
                ..
            })
        );
        if refused {
            let mut attempts = 0;
            let listener = loop {
                match tokio::net::TcpListener::bind(self.address).await {
                    Ok(listener) => break listener,
                    Err(e) if attempts < 100 => {
                        attempts += 1;
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("re-open the fault proxy on {}: {e}", self.address),
                }
            };
            self.serve(listener);
        }
    }

    /// How many requests met the fault (0 for `Refused`, which nothing reaches).
    pub fn hits(&self) -> usize {
        *self.shared.hits.lock().unwrap()
    }

    /// The requests forwarded since the last call, oldest first.
    pub fn take_exchanges(&self) -> Vec<Exchange> {
        std::mem::take(&mut *self.shared.exchanges.lock().unwrap())
    }
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let fault = {
        let mut fault = shared.fault.lock().unwrap();
        let matched = fault.filter(|f| f.matcher.matches(&request));
        if matched.is_some_and(|f| f.failure == Failure::LostAnswer) {
            *fault = None;
        }
        matched
    };
    if let Some(fault) = fault {
        *shared.hits.lock().unwrap() += 1;
        if matches!(fault.failure, Failure::LostAnswer | Failure::LostAnswers) {
            let _applied = pass_on(&shared, request).await;
        }
        return fail(fault).await;
    }
    pass_on(&shared, request).await
}

/// Forwards the request upstream and returns its answer, logging the exchange.
async fn pass_on(shared: &Shared, request: Request) -> Response {
    let started = Instant::now();
    let what = match request.headers().get("x-amz-target") {
        Some(target) => target.to_str().unwrap_or("?").to_owned(),
        None => request.uri().path().to_owned(),
    };
    let (parts, body) = request.into_parts();
    let Ok(body) = to_bytes(body, 16 * 1024 * 1024).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut upstream = shared
        .client
        .request(parts.method, format!("{}{path}", shared.upstream))
        .body(body);
    for (name, value) in &parts.headers {
        // `host` is kept: it is part of what AWS clients sign, and moto checks signatures.
        if name != "content-length" {
            upstream = upstream.header(name, value);
        }
    }
    match upstream.send().await {
        Ok(answer) => {
            let status = answer.status();
            let headers = answer.headers().clone();
            let bytes = answer.bytes().await.unwrap_or_default();
            shared.exchanges.lock().unwrap().push(Exchange {
                what,
                started,
                finished: Instant::now(),
            });
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            for (name, value) in &headers {
                if name != "content-length" && name != "transfer-encoding" && name != "connection" {
                    response.headers_mut().append(name, value.clone());
                }
            }
            response
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

async fn fail(fault: Fault) -> Response {
    let aws = fault.matcher.is_aws();
    let (status, content_type, body, retry_after) = match fault.failure {
        Failure::Timeout | Failure::Refused => {
            tokio::time::sleep(Duration::from_secs(120)).await;
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
        Failure::ServerError | Failure::LostAnswer | Failure::LostAnswers if aws => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "application/x-amz-json-1.0",
            r#"{"__type":"InternalServerError","message":"injected fault"}"#,
            None,
        ),
        Failure::ServerError | Failure::LostAnswer | Failure::LostAnswers => (
            StatusCode::SERVICE_UNAVAILABLE,
            "application/vnd.api+json",
            r#"{"errors":[{"status":"503","code":"service_unavailable","detail":"injected fault"}]}"#,
            None,
        ),
        Failure::Throttled if aws => (
            StatusCode::BAD_REQUEST,
            "application/x-amz-json-1.0",
            r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#,
            None,
        ),
        Failure::Throttled => (
            StatusCode::TOO_MANY_REQUESTS,
            "application/vnd.api+json",
            r#"{"errors":[{"status":"429","code":"throttled","detail":"injected fault"}]}"#,
            Some("1"),
        ),
        Failure::Malformed if aws => (
            StatusCode::OK,
            "application/x-amz-json-1.0",
            r#"{"Item": {"pk": {"S": "#,
            None,
        ),
        Failure::Malformed => (
            StatusCode::OK,
            "text/html",
            "<html>upstream proxy error</html>",
            None,
        ),
    };
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static(seconds));
    }
    response
}

/// Proxies in front of moto and the sandbox, and functions that reach them only through
/// those proxies.
pub struct Stage {
    pub aws: FaultProxy,
    pub klaviyo: FaultProxy,
}

impl Stage {
    pub async fn new() -> Self {
        Self {
            aws: FaultProxy::start(&crate::setting("AWS_ENDPOINT_URL")).await,
            klaviyo: FaultProxy::start(&crate::sandbox_url()).await,
        }
    }

    pub async fn function(&self, name: &str) -> LocalLambda {
        self.function_with(name, &[]).await
    }

    /// The callback with `CONNECT_COMPLETION=off`: it connects at once (the one-step flow).
    pub async fn one_step_callback(&self) -> LocalLambda {
        self.function_with("callback", &[("CONNECT_COMPLETION", "off".to_owned())])
            .await
    }

    pub async fn function_with(&self, name: &str, settings: &[(&str, String)]) -> LocalLambda {
        let klaviyo = self.klaviyo.url();
        let mut overrides = vec![
            ("AWS_ENDPOINT_URL", self.aws.url()),
            ("KLAVIYO_OAUTH_BASE", klaviyo.clone()),
            ("KLAVIYO_API_BASE", format!("{klaviyo}/api")),
        ];
        overrides.extend(settings.iter().cloned());
        LocalLambda::start(name, &overrides).await
    }

    fn proxy(&self, matcher: Matcher) -> &FaultProxy {
        match matcher {
            Matcher::AwsTarget(_) => &self.aws,
            Matcher::Path(_) => &self.klaviyo,
        }
    }

    pub async fn inject(&self, matcher: Matcher, failure: Failure) {
        self.proxy(matcher).inject(Fault { matcher, failure }).await;
    }

    pub async fn clear(&self, matcher: Matcher) {
        self.proxy(matcher).clear().await;
    }
}
