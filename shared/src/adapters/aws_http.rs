//! The AWS SDK's HTTP client: reqwest, the client every Klaviyo call already uses, so each
//! binary carries one HTTP client, one TLS stack and one set of trust anchors (#21).
//!
//! The SDK's own client (aws-smithy-http-client) brings HTTP/2 (h2, which no API this service
//! calls needs) and reads the system's CA certificates at start-up: every file of
//! `/etc/ssl/certs` here, the bundles of `/etc/pki/tls/certs` on Lambda, 2.3 of the 6.1 ms
//! a function needs to start on this machine (docs/PERFORMANCE.md). reqwest trusts the
//! Mozilla roots compiled into it (webpki-roots), which include Amazon's; nothing is read
//! from disk. A TLS-intercepting proxy with a private CA is therefore not supported. reqwest
//! carries the URI as a parsed URL, which is exact for the JSON-protocol services used here
//! (every request goes to `/`); a path-based service (S3) would need checking against SigV4.
//!
//! The SDK asks for a connector per set of timeouts (connect, read); one reqwest client is
//! kept per set, so all SDK clients of a process share its connection pool. Redirects are
//! not followed and no proxy is used, as with the SDK's own client. Errors are classified
//! the way the SDK's client classifies them, because its retry policy reads the kind:
//! timeouts and I/O errors (refused, reset, closed) are retried, a request that cannot be
//! built is not. When the SDK retries after a transient failure (a 5xx, a timeout) it asks
//! for the connection to be closed, so the retry may reach another host; reqwest cannot
//! close one pooled connection, so the connector starts a fresh pool instead (rare, and what
//! the SDK's own client achieves by closing the one connection).

use aws_smithy_runtime_api::client::connection::{CaptureSmithyConnection, ConnectionMetadata};
use aws_smithy_runtime_api::client::connector_metadata::ConnectorMetadata;
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::Response;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::retry::ErrorKind;
use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// How long an idle connection to AWS is kept (the SDK's own client keeps them 90 s).
const POOL_IDLE: Duration = Duration::from_secs(90);

/// The SDK's HTTP client on reqwest.
pub fn client() -> SharedHttpClient {
    SharedHttpClient::new(Reqwest::default())
}

type Timeouts = (Option<Duration>, Option<Duration>);

#[derive(Debug, Default, Clone)]
struct Reqwest {
    connectors: Arc<Mutex<Vec<(Timeouts, SharedHttpConnector)>>>,
}

impl HttpClient for Reqwest {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        let timeouts = (settings.connect_timeout(), settings.read_timeout());
        let mut connectors = self.connectors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, connector)) = connectors.iter().find(|(t, _)| *t == timeouts) {
            return connector.clone();
        }
        let connector = SharedHttpConnector::new(Connector::new(timeouts));
        connectors.push((timeouts, connector.clone()));
        connector
    }

    fn connector_metadata(&self) -> Option<ConnectorMetadata> {
        Some(ConnectorMetadata::new("reqwest", None))
    }
}

#[derive(Debug)]
struct Connector {
    timeouts: Timeouts,
    /// `Err` when reqwest could not be set up (no TLS backend): every call then fails with
    /// that reason instead of the process panicking.
    client: RwLock<Result<reqwest::Client, String>>,
    /// Set when the SDK asked to close a connection: the next call starts a fresh pool.
    poisoned: Arc<AtomicBool>,
}

impl Connector {
    fn new(timeouts: Timeouts) -> Self {
        Self {
            timeouts,
            client: RwLock::new(Self::build(timeouts)),
            poisoned: Arc::default(),
        }
    }

    fn build((connect, read): Timeouts) -> Result<reqwest::Client, String> {
        let mut builder = crate::http_client()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(POOL_IDLE);
        if let Some(connect) = connect {
            builder = builder.connect_timeout(connect);
        }
        if let Some(read) = read {
            builder = builder.read_timeout(read);
        }
        builder
            .build()
            .map_err(|e| DisplayErrorContext(&e).to_string())
    }

    /// The client to send with: a new one (a fresh pool) if a connection was poisoned.
    fn client(&self) -> Result<reqwest::Client, String> {
        if self.poisoned.swap(false, Ordering::AcqRel) {
            let fresh = Self::build(self.timeouts);
            *self.client.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        }
        self.client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl HttpConnector for Connector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let client = match self.client() {
            Ok(client) => client,
            Err(reason) => {
                let reason = format!("the HTTP client could not be set up: {reason}");
                return HttpConnectorFuture::ready(Err(ConnectorError::user(reason.into())));
            }
        };
        let request = match request.try_into_http1x() {
            Ok(request) => request,
            Err(error) => {
                return HttpConnectorFuture::ready(Err(ConnectorError::user(error.into())));
            }
        };
        if let Some(capture) = request.extensions().get::<CaptureSmithyConnection>() {
            let poisoned = self.poisoned.clone();
            capture.set_connection_retriever(move || {
                let poisoned = poisoned.clone();
                let metadata = ConnectionMetadata::builder()
                    .proxied(false)
                    .poison_fn(move || poisoned.store(true, Ordering::Release))
                    .build();
                Some(metadata)
            });
        }
        let request = match reqwest::Request::try_from(request.map(reqwest::Body::wrap)) {
            Ok(request) => request,
            Err(error) => {
                return HttpConnectorFuture::ready(Err(ConnectorError::user(error.into())));
            }
        };
        HttpConnectorFuture::new(async move {
            let response = client.execute(request).await.map_err(classify)?;
            let response = http::Response::from(response).map(SdkBody::from_body_1_x);
            Response::try_from(response).map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

/// The kind the SDK's retry policy reads, as its own client would report it.
fn classify(error: reqwest::Error) -> ConnectorError {
    if error.is_timeout() {
        return ConnectorError::timeout(error.into());
    }
    if error.is_builder() {
        return ConnectorError::user(error.into());
    }
    let hyper = find::<hyper::Error>(&error);
    if hyper.is_some_and(hyper::Error::is_incomplete_message) {
        return ConnectorError::other(error.into(), Some(ErrorKind::TransientError));
    }
    if error.is_connect()
        || find::<std::io::Error>(&error).is_some()
        || hyper.is_some_and(|e| e.is_closed() || e.is_canceled())
    {
        return ConnectorError::io(error.into());
    }
    ConnectorError::other(error.into(), None)
}

fn find<'a, E: Error + 'static>(error: &'a (dyn Error + 'static)) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(found) = error.downcast_ref::<E>() {
            return Some(found);
        }
        next = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_runtime_api::client::runtime_components::RuntimeComponentsBuilder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn connector(timeouts: HttpConnectorSettings) -> SharedHttpConnector {
        let components = RuntimeComponentsBuilder::for_tests().build().unwrap();
        client().http_connector(&timeouts, &components)
    }

    fn request(url: &str, body: &'static str) -> HttpRequest {
        let request = http::Request::builder()
            .method("POST")
            .uri(url)
            .header("content-type", "application/x-amz-json-1.0")
            .body(SdkBody::from(body))
            .unwrap();
        HttpRequest::try_from(request).unwrap()
    }

    /// A server that answers each connection with `answer` after reading one request, and
    /// hands back what it read.
    async fn server(answer: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut read = Vec::new();
            let mut buffer = [0u8; 4096];
            while !String::from_utf8_lossy(&read).contains("{\"TableName\"") {
                let n = socket.read(&mut buffer).await.unwrap();
                if n == 0 {
                    break;
                }
                read.extend_from_slice(&buffer[..n]);
            }
            socket.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(read).unwrap()
        });
        (url, task)
    }

    #[tokio::test]
    async fn sends_the_request_and_hands_back_status_headers_and_body() {
        let (url, server) = server(
            "HTTP/1.1 400 Bad Request\r\nx-amzn-requestid: r-1\r\ncontent-length: 2\r\n\r\n{}",
        )
        .await;
        let response = connector(HttpConnectorSettings::builder().build())
            .call(request(&url, "{\"TableName\":\"t\"}"))
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400);
        assert_eq!(response.headers().get("x-amzn-requestid"), Some("r-1"));
        assert_eq!(
            response.body().bytes(),
            None,
            "streamed, as from the SDK's client"
        );
        let sent = server.await.unwrap();
        assert!(sent.starts_with("POST / HTTP/1.1\r\n"), "{sent}");
        assert!(
            sent.contains("content-type: application/x-amz-json-1.0"),
            "{sent}"
        );
        assert!(sent.contains("content-length: 17"), "{sent}");
        assert!(sent.ends_with("{\"TableName\":\"t\"}"), "{sent}");
    }

    #[tokio::test]
    async fn a_redirect_is_handed_back_not_followed() {
        let (url, _server) =
            server("HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:9/\r\ncontent-length: 0\r\n\r\n").await;
        let response = connector(HttpConnectorSettings::builder().build())
            .call(request(&url, "{\"TableName\":\"t\"}"))
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 307);
    }

    #[tokio::test]
    async fn failures_have_the_kinds_the_retry_policy_reads() {
        // Refused: I/O, retried.
        let refused = connector(HttpConnectorSettings::builder().build())
            .call(request("http://127.0.0.1:9/", "{}"))
            .await
            .unwrap_err();
        assert!(refused.is_io(), "{refused:?}");

        // Closed before an answer: I/O or transient, retried either way.
        let (url, _server) = server("").await;
        let closed = connector(HttpConnectorSettings::builder().build())
            .call(request(&url, "{\"TableName\":\"t\"}"))
            .await
            .unwrap_err();
        assert!(
            closed.is_io() || closed.as_other() == Some(ErrorKind::TransientError),
            "{closed:?}"
        );

        // No answer within the read timeout: a timeout.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let _silent = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(socket);
        });
        let settings = HttpConnectorSettings::builder()
            .read_timeout(Duration::from_millis(200))
            .build();
        let slow = connector(settings)
            .call(request(&url, "{}"))
            .await
            .unwrap_err();
        assert!(slow.is_timeout(), "{slow:?}");

        // Not a URL a request can be made for: the caller's error, not retried.
        let bad = connector(HttpConnectorSettings::builder().build())
            .call(request("ftp://127.0.0.1/", "{}"))
            .await
            .unwrap_err();
        assert!(bad.is_user(), "{bad:?}");
    }

    /// Answers `statuses` in turn (keep-alive), counting connections and requests.
    async fn dynamodb(statuses: Vec<u16>) -> (String, Arc<Mutex<(usize, usize)>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let counts = Arc::new(Mutex::new((0, 0)));
        let (seen, statuses) = (counts.clone(), Arc::new(Mutex::new(statuses.into_iter())));
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                seen.lock().unwrap().0 += 1;
                let (seen, statuses) = (seen.clone(), statuses.clone());
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    let mut buffer = [0u8; 8192];
                    loop {
                        let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match socket.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => read.extend_from_slice(&buffer[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&read[..end]).to_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while read.len() < end + 4 + length {
                            match socket.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => read.extend_from_slice(&buffer[..n]),
                            }
                        }
                        read.drain(..end + 4 + length);
                        seen.lock().unwrap().1 += 1;
                        let status = statuses.lock().unwrap().next().unwrap_or(200);
                        let body = if status == 200 {
                            "{}"
                        } else {
                            r#"{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError","message":"injected"}"#
                        };
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.0\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, counts)
    }

    /// Through a DynamoDB client: two 500s then success, each retry on a fresh connection
    /// (the SDK poisons the one that failed), and calls that succeed keep their connection.
    #[tokio::test]
    async fn a_retry_after_a_server_error_goes_out_on_a_fresh_connection() {
        use aws_sdk_dynamodb::config::{Credentials, Region};
        let (url, counts) = dynamodb(vec![500, 500]).await;
        let retries = aws_config::retry::RetryConfig::standard()
            .with_max_attempts(3)
            .with_initial_backoff(Duration::from_millis(1));
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .http_client(client())
            .endpoint_url(&url)
            .region(Region::new("us-east-1"))
            .retry_config(retries)
            .credentials_provider(Credentials::new(
                "AKIDTESTNOTREAL",
                "not-a-secret",
                None,
                None,
                "unit",
            ))
            .build();
        let dynamodb = aws_sdk_dynamodb::Client::from_conf(config);
        let put = || {
            dynamodb
                .put_item()
                .table_name("t")
                .item("pk", aws_sdk_dynamodb::types::AttributeValue::S("a".into()))
                .send()
        };
        put().await.expect("succeeds on the third attempt");
        assert_eq!(*counts.lock().unwrap(), (3, 3), "(connections, requests)");
        put().await.expect("succeeds");
        put().await.expect("succeeds");
        assert_eq!(
            *counts.lock().unwrap(),
            (3, 5),
            "healthy connections are kept"
        );
    }

    #[test]
    fn one_connector_per_set_of_timeouts() {
        let components = RuntimeComponentsBuilder::for_tests().build().unwrap();
        let client = Reqwest::default();
        let a = HttpConnectorSettings::builder()
            .connect_timeout(Duration::from_secs(1))
            .build();
        let b = HttpConnectorSettings::builder()
            .connect_timeout(Duration::from_secs(2))
            .build();
        for settings in [&a, &a, &b, &a] {
            client.http_connector(settings, &components);
        }
        assert_eq!(client.connectors.lock().unwrap().len(), 2);
    }
}
