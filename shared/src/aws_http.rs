//! The AWS SDK's HTTP client: reqwest, the client every Klaviyo call already uses, so each
//! binary carries one HTTP client, one TLS stack and one set of trust anchors (#21).
//!
//! The SDK's own client (aws-smithy-http-client) brings HTTP/2 (h2, which no API this service
//! calls needs) and reads the system's CA certificates at start-up: every file of
//! `/etc/ssl/certs` here, the bundles of `/etc/pki/tls/certs` on Lambda, 2.3 of the 6.1 ms
//! a function needs to start on this machine (docs/PERFORMANCE.md). reqwest trusts the
//! Mozilla roots compiled into it (webpki-roots), which include Amazon's; nothing is read
//! from disk. A TLS-intercepting proxy with a private CA is therefore not supported.
//!
//! The SDK asks for a connector per set of timeouts (connect, read); one reqwest client is
//! kept per set, so all SDK clients of a process share its connection pool. Redirects are
//! not followed and no proxy is used, as with the SDK's own client. Errors are classified
//! the way the SDK's client classifies them, because its retry policy reads the kind:
//! timeouts and I/O errors (refused, reset, closed) are retried, a request that cannot be
//! built is not.

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
use std::sync::{Arc, Mutex};
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
    /// `None` when reqwest could not be set up (no TLS backend): every call then fails with
    /// that reason instead of the process panicking.
    client: Result<reqwest::Client, String>,
}

impl Connector {
    fn new((connect, read): Timeouts) -> Self {
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
        let client = builder
            .build()
            .map_err(|e| DisplayErrorContext(&e).to_string());
        Self { client }
    }
}

impl HttpConnector for Connector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let client = match &self.client {
            Ok(client) => client.clone(),
            Err(reason) => {
                let reason = format!("the HTTP client could not be set up: {reason}");
                return HttpConnectorFuture::ready(Err(ConnectorError::user(reason.into())));
            }
        };
        let request = request
            .try_into_http1x()
            .map_err(|e| ConnectorError::user(e.into()))
            .and_then(|request| {
                reqwest::Request::try_from(request.map(reqwest::Body::wrap))
                    .map_err(|e| ConnectorError::user(e.into()))
            });
        let request = match request {
            Ok(request) => request,
            Err(error) => return HttpConnectorFuture::ready(Err(error)),
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
