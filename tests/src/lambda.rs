//! A local Lambda: one function binary (`target/debug/<name>`) started as its own process
//! against a minimal Lambda Runtime API served here, so a test can give one process its own
//! configuration (an AWS endpoint behind a fault proxy, say) and send it API Gateway events
//! that `cargo lambda watch` cannot produce (a base64 body that is not UTF-8).
//!
//! The Runtime API part is the documented one: `GET /2018-06-01/runtime/invocation/next`
//! hands out events with the request-id and deadline headers, and the function posts to
//! `…/{id}/response`, `…/{id}/error` or `/runtime/init/error`.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What a function answered to one event.
#[derive(Debug)]
pub enum Outcome {
    Response(Value),
    /// The runtime reported an error (`…/error`), e.g. a handler that returned `Err`.
    Error(Value),
}

/// An API Gateway HTTP API response, as the function returned it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Lower-cased names.
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("JSON body expected ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

struct Invocation {
    id: String,
    event: Value,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Runtime {
    queue: Mutex<Option<mpsc::UnboundedReceiver<Invocation>>>,
    waiting: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
    first_poll: Mutex<Option<Instant>>,
    init_error: Mutex<Option<Value>>,
}

/// A running function process and the Runtime API it polls. Killed on drop.
pub struct LocalLambda {
    name: String,
    sender: mpsc::UnboundedSender<Invocation>,
    runtime: Arc<Runtime>,
    child: tokio::process::Child,
    started: Instant,
    log: std::path::PathBuf,
}

/// Where cargo put the function binaries: next to this test binary's `deps/` folder.
fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        path.display()
    );
    path
}

impl LocalLambda {
    /// Starts function `name` with the test's environment plus `overrides`.
    pub async fn start(name: &str, overrides: &[(&str, String)]) -> Self {
        let runtime = Arc::new(Runtime::default());
        let (sender, receiver) = mpsc::unbounded_channel();
        *runtime.queue.lock().unwrap() = Some(receiver);
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(respond),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(fail))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(runtime.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Runtime API");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let log = std::env::temp_dir().join(format!(
            "klaviyo-connect-{name}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let log_file = std::fs::File::create(&log).expect("function log file");
        let mut command = tokio::process::Command::new(binary(name));
        command
            .env("AWS_LAMBDA_RUNTIME_API", address.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", name)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "local")
            // The function's own IAM user (scripts/provision.py), as under `cargo lambda watch`.
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env("AWS_PROFILE", name)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .kill_on_drop(true);
        for (key, value) in overrides {
            command.env(key, value);
        }
        let started = Instant::now();
        let child = command.spawn().expect("start the function");
        Self {
            name: name.to_owned(),
            sender,
            runtime,
            child,
            started,
            log,
        }
    }

    /// Sends one event and waits for the function's answer.
    pub async fn invoke(&self, event: Value) -> Outcome {
        let (reply, answer) = oneshot::channel();
        let id = uuid::Uuid::new_v4().to_string();
        self.sender
            .send(Invocation { id, event, reply })
            .expect("runtime alive");
        match tokio::time::timeout(Duration::from_secs(60), answer).await {
            Ok(Ok(outcome)) => outcome,
            _ => panic!(
                "{} gave no answer within 60 s (init error: {:?}); log: {}",
                self.name,
                self.runtime.init_error.lock().unwrap(),
                self.log()
            ),
        }
    }

    /// Sends an API Gateway HTTP API event and returns the HTTP response it produced.
    pub async fn http(&self, request: ApiRequest) -> HttpReply {
        match self.invoke(request.event()).await {
            Outcome::Response(value) => http_reply(&value),
            Outcome::Error(error) => panic!("{} failed: {error}; log: {}", self.name, self.log()),
        }
    }

    /// Time from process start to its first poll for work: the function's init.
    pub async fn init_duration(&self) -> Duration {
        for _ in 0..600 {
            if let Some(at) = *self.runtime.first_poll.lock().unwrap() {
                return at - self.started;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{} never polled for work; log: {}", self.name, self.log())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LocalLambda {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

async fn next(State(runtime): State<Arc<Runtime>>) -> Response {
    runtime
        .first_poll
        .lock()
        .unwrap()
        .get_or_insert_with(Instant::now);
    let receiver = runtime.queue.lock().unwrap().take();
    let Some(mut receiver) = receiver else {
        return (StatusCode::CONFLICT, "one poller at a time").into_response();
    };
    let invocation = receiver.recv().await;
    *runtime.queue.lock().unwrap() = Some(receiver);
    let Some(invocation) = invocation else {
        return StatusCode::GONE.into_response();
    };
    runtime
        .waiting
        .lock()
        .unwrap()
        .insert(invocation.id.clone(), invocation.reply);
    // A deadline like the refresh function's timeout (300 s): the job plans its work by it.
    let deadline = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000 + 300_000;
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        headers.insert(name, HeaderValue::from_str(&value).expect("header"));
    };
    set("lambda-runtime-aws-request-id", invocation.id);
    set("lambda-runtime-deadline-ms", deadline.to_string());
    set(
        "lambda-runtime-invoked-function-arn",
        "arn:aws:lambda:us-east-1:123456789012:function:local".into(),
    );
    set(
        "lambda-runtime-trace-id",
        "Root=1-00000000-000000000000000000000000".into(),
    );
    set("content-type", "application/json".into());
    (headers, invocation.event.to_string()).into_response()
}

fn finish(runtime: &Runtime, id: &str, outcome: Outcome) -> StatusCode {
    match runtime.waiting.lock().unwrap().remove(id) {
        Some(reply) => {
            let _ = reply.send(outcome);
            StatusCode::ACCEPTED
        }
        None => StatusCode::BAD_REQUEST,
    }
}

async fn respond(
    State(runtime): State<Arc<Runtime>>,
    Path(id): Path<String>,
    body: Bytes,
) -> StatusCode {
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    finish(&runtime, &id, Outcome::Response(value))
}

async fn fail(
    State(runtime): State<Arc<Runtime>>,
    Path(id): Path<String>,
    body: Bytes,
) -> StatusCode {
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    finish(&runtime, &id, Outcome::Error(value))
}

async fn init_error(State(runtime): State<Arc<Runtime>>, body: Bytes) -> StatusCode {
    *runtime.init_error.lock().unwrap() =
        Some(serde_json::from_slice(&body).unwrap_or(Value::Null));
    StatusCode::ACCEPTED
}

fn http_reply(value: &Value) -> HttpReply {
    let mut headers = HashMap::new();
    for (name, v) in value["headers"].as_object().into_iter().flatten() {
        headers.insert(
            name.to_lowercase(),
            v.as_str().unwrap_or_default().to_owned(),
        );
    }
    for (name, values) in value["multiValueHeaders"].as_object().into_iter().flatten() {
        let joined: Vec<&str> = values
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !joined.is_empty() {
            headers.insert(name.to_lowercase(), joined.join(", "));
        }
    }
    let raw = value["body"].as_str().unwrap_or_default();
    let body = if value["isBase64Encoded"] == true {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(raw)
            .expect("base64 body");
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        raw.to_owned()
    };
    HttpReply {
        status: value["statusCode"].as_u64().expect("statusCode") as u16,
        headers,
        body,
    }
}

/// An HTTP request as API Gateway's HTTP API (payload format 2.0) hands it to Lambda.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Option<(String, bool)>,
    path_parameters: Option<Value>,
    /// A non-HTTP event (a schedule), sent as is.
    raw: Option<Value>,
}

impl ApiRequest {
    pub fn new(method: &str, path_and_query: &str) -> Self {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        Self {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            headers: Vec::new(),
            body: None,
            path_parameters: None,
            raw: None,
        }
    }

    /// Any other event (an EventBridge schedule), sent as is.
    pub fn raw(event: Value) -> Self {
        let mut request = Self::new("POST", "/");
        request.raw = Some(event);
        request
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_lowercase(), value.to_owned()));
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    pub fn json(self, body: &Value) -> Self {
        let mut request = self.header("content-type", "application/json");
        request.body = Some((body.to_string(), false));
        request
    }

    /// A body API Gateway passes base64-encoded (binary, or not valid UTF-8).
    pub fn binary_body(mut self, bytes: &[u8]) -> Self {
        self.body = Some((
            base64::engine::general_purpose::STANDARD.encode(bytes),
            true,
        ));
        self
    }

    pub fn path_parameter(mut self, name: &str, value: &str) -> Self {
        self.path_parameters = Some(json!({ name: value }));
        self
    }

    pub fn event(&self) -> Value {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        let headers: serde_json::Map<String, Value> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let query: serde_json::Map<String, Value> =
            url::form_urlencoded::parse(self.query.as_bytes())
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                .collect();
        let (body, encoded) = match &self.body {
            Some((body, encoded)) => (Value::String(body.clone()), *encoded),
            None => (Value::Null, false),
        };
        let mut event = json!({
            "version": "2.0",
            "routeKey": format!("ANY {}", self.path),
            "rawPath": self.path,
            "rawQueryString": self.query,
            "headers": headers,
            "requestContext": {
                "accountId": "123456789012",
                "apiId": "local",
                "domainName": "local.execute-api.us-east-1.amazonaws.com",
                "domainPrefix": "local",
                "http": {
                    "method": self.method,
                    "path": self.path,
                    "protocol": "HTTP/1.1",
                    "sourceIp": "127.0.0.1",
                    "userAgent": "e2e"
                },
                "requestId": uuid::Uuid::new_v4().to_string(),
                "routeKey": format!("ANY {}", self.path),
                "stage": "$default",
                "time": "23/Nov/2026:00:00:00 +0000",
                "timeEpoch": 0
            },
            "body": body,
            "isBase64Encoded": encoded
        });
        if !query.is_empty() {
            event["queryStringParameters"] = Value::Object(query);
        }
        if let Some(parameters) = &self.path_parameters {
            event["pathParameters"] = parameters.clone();
        }
        event
    }
}
