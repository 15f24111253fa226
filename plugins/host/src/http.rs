//! [`HyperHttp`]: the `http` service the daemon gives plugins, on hyper 1 and
//! hyper-util's pooled client, with a timeout and a per-instance host allow-list.
//!
//! Both `http://` and `https://`: TLS is rustls (on ring), trusting the webpki roots
//! (Mozilla's) plus any extra PEM roots given with [`HyperHttp::with_extra_roots`]
//! (private CAs, tests). The operating system's trust store is not consulted.
//! Redirects are not followed.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::runtime::Handle;

use crate::types::{HttpRequest, HttpResponse};

/// Why a plugin's HTTP request failed. Messages name hosts, never bodies.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL could not be parsed.
    #[error("the URL is not valid: {0}")]
    InvalidUrl(String),
    /// The URL's scheme is neither `http` nor `https`.
    #[error("only http:// and https:// URLs are supported")]
    UnsupportedScheme,
    /// The URL's host is not on the instance's allow-list.
    #[error("host {host} is not on the allow-list of gateway instance {instance}")]
    NotAllowed {
        /// The instance.
        instance: String,
        /// The refused `host:port`.
        host: String,
    },
    /// The method or a header is invalid.
    #[error("the request is invalid: {0}")]
    InvalidRequest(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting, sending or receiving failed.
    #[error("the request failed: {0}")]
    Transport(String),
    /// The response body is larger than allowed.
    #[error("the response body exceeds {0} bytes")]
    TooLarge(usize),
}

/// The daemon's HTTP client for plugins. Call [`HyperHttp::request`] from a blocking
/// thread (it `block_on`s the runtime it was given), never from an async task.
pub struct HyperHttp {
    /// The runtime whose reactor drives connections; blocking threads wait on it.
    runtime: Handle,
    /// One pooled client for every instance (connections are reused per host).
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The roots TLS trusts: the webpki roots plus any extra ones.
    roots: RootCertStore,
    /// The default timeout, also the ceiling of a plugin's own timeout.
    timeout: Duration,
    /// Responses larger than this are refused, so a plugin cannot exhaust memory.
    max_response_bytes: usize,
    /// Instance name → allowed `host` or `host:port` entries (lower-case). Reloadable.
    allowed: RwLock<HashMap<String, Vec<String>>>,
}

impl std::fmt::Debug for HyperHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperHttp")
            .field("timeout", &self.timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

/// The default cap on response bodies: 4 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 4 << 20;

impl HyperHttp {
    /// A client on `runtime` with a default (and maximum) timeout. No instance may
    /// reach any host until [`HyperHttp::set_allowed_hosts`] allows it.
    pub fn new(runtime: Handle, timeout: Duration) -> Self {
        let roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let client = build_client(&roots);
        HyperHttp {
            runtime,
            client,
            roots,
            timeout,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            allowed: RwLock::new(HashMap::new()),
        }
    }

    /// Also trusts the root certificates in `pem` (one or more `CERTIFICATE` blocks),
    /// for gateways behind a private CA. Fails if `pem` holds no certificate or one
    /// that cannot be parsed.
    pub fn with_extra_roots(mut self, pem: &[u8]) -> Result<Self, String> {
        let mut added = 0_usize;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("invalid PEM certificate: {e}"))?;
            self.roots
                .add(cert)
                .map_err(|e| format!("invalid root certificate: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err("no PEM certificate found".to_owned());
        }
        self.client = build_client(&self.roots);
        Ok(self)
    }

    /// Changes the cap on response bodies.
    pub fn with_max_response_bytes(mut self, max: usize) -> Self {
        self.max_response_bytes = max;
        self
    }

    /// Replaces the hosts `instance` may reach: entries are `host` (any port) or
    /// `host:port`, compared case-insensitively. Takes effect for the next request.
    pub fn set_allowed_hosts<I, S>(&self, instance: &str, hosts: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let hosts = hosts
            .into_iter()
            .map(|h| h.as_ref().to_ascii_lowercase())
            .collect();
        self.allowed
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(instance.to_owned(), hosts);
    }

    /// Forgets an instance's allow-list (it may reach nothing).
    pub fn remove_instance(&self, instance: &str) {
        self.allowed
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(instance);
    }

    fn check_allowed(&self, instance: &str, uri: &Uri) -> Result<(), HttpError> {
        let host = uri.host().unwrap_or_default().to_ascii_lowercase();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let default_port = if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        let port = uri.port_u16().unwrap_or(default_port);
        let allowed = self.allowed.read().unwrap_or_else(PoisonError::into_inner);
        let ok = allowed.get(instance).is_some_and(|entries| {
            entries.iter().any(|entry| {
                let entry = entry.as_str();
                entry == host
                    || entry == format!("{host}:{port}")
                    || entry == format!("[{host}]:{port}")
            })
        });
        if ok {
            Ok(())
        } else {
            Err(HttpError::NotAllowed {
                instance: instance.to_owned(),
                host: format!("{host}:{port}"),
            })
        }
    }

    /// Performs `request` for `instance`, blocking the calling thread until the
    /// answer, the timeout or an error.
    pub fn request(&self, instance: &str, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let uri: Uri = request
            .url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| HttpError::InvalidUrl(e.to_string()))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            Some(_) => return Err(HttpError::UnsupportedScheme),
            None => return Err(HttpError::InvalidUrl("the URL must be absolute".to_owned())),
        }
        self.check_allowed(instance, &uri)?;
        let method = Method::from_bytes(request.method.as_bytes())
            .map_err(|_| HttpError::InvalidRequest("invalid method".to_owned()))?;
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let hyper_request = builder
            .body(Full::new(Bytes::from(request.body)))
            .map_err(|e| HttpError::InvalidRequest(e.to_string()))?;
        let timeout = request
            .timeout
            .map_or(self.timeout, |t| t.min(self.timeout));
        let max = self.max_response_bytes;
        let client = self.client.clone();
        let exchange = async move {
            let response = client
                .request(hyper_request)
                .await
                .map_err(|e| HttpError::Transport(describe(&e)))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, max).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    HttpError::TooLarge(max)
                } else {
                    HttpError::Transport(e.to_string())
                }
            })?;
            let headers = parts
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect();
            Ok(HttpResponse {
                status: parts.status.as_u16(),
                headers,
                body: body.to_bytes().to_vec(),
            })
        };
        self.runtime.block_on(async move {
            tokio::time::timeout(timeout, exchange)
                .await
                .unwrap_or(Err(HttpError::Timeout(timeout)))
        })
    }
}

/// A pooled client that speaks `http` and `https` (HTTP/1.1), trusting `roots`.
fn build_client(roots: &RootCertStore) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
    // The provider is named rather than taken from the process default, so another
    // crate enabling a second rustls provider cannot make this panic.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    #[allow(
        clippy::expect_used,
        reason = "ring supports the safe default protocol versions"
    )]
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn client() -> (tokio::runtime::Runtime, HyperHttp) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let http = HyperHttp::new(runtime.handle().clone(), Duration::from_secs(2));
        (runtime, http)
    }

    fn get(url: &str) -> HttpRequest {
        HttpRequest {
            method: "GET".into(),
            url: url.into(),
            headers: vec![],
            body: vec![],
            timeout: None,
        }
    }

    #[test]
    fn allow_list_is_per_instance_and_port_aware() {
        let (_runtime, http) = client();
        http.set_allowed_hosts("a", ["127.0.0.1:9", "Example.invalid"]);
        let cases = [
            ("a", "http://127.0.0.1:9/", true),
            ("a", "http://127.0.0.1:10/", false),
            ("a", "http://example.invalid/x", true),
            ("a", "http://example.invalid:8080/x", true),
            ("b", "http://127.0.0.1:9/", false),
        ];
        for (instance, url, allowed) in cases {
            let uri: Uri = url.parse().expect("uri");
            assert_eq!(
                http.check_allowed(instance, &uri).is_ok(),
                allowed,
                "{instance} {url}"
            );
        }
    }

    #[test]
    fn allows_https_but_refuses_other_schemes_and_relative_urls() {
        let (_runtime, http) = client();
        // A loopback port with nothing behind it: https passes the scheme and
        // allow-list checks, then the connection is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        http.set_allowed_hosts("a", [format!("127.0.0.1:{port}"), "example.invalid".into()]);
        let result = http.request("a", get(&format!("https://127.0.0.1:{port}/")));
        assert!(matches!(result, Err(HttpError::Transport(_))), "{result:?}");
        assert!(matches!(
            http.request("a", get("ftp://example.invalid/")),
            Err(HttpError::UnsupportedScheme)
        ));
        assert!(matches!(
            http.request("a", get("/relative")),
            Err(HttpError::InvalidUrl(_))
        ));
        assert!(matches!(
            http.request("b", get("http://example.invalid/")),
            Err(HttpError::NotAllowed { .. })
        ));
    }

    #[test]
    fn extra_roots_must_be_pem_certificates() {
        let (_runtime, http) = client();
        let err = http
            .with_extra_roots(b"not a certificate")
            .expect_err("no PEM");
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn connection_refused_is_a_transport_error() {
        let (_runtime, http) = client();
        // Bind and drop a listener to get a loopback port with nothing behind it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        http.set_allowed_hosts("a", [format!("127.0.0.1:{port}")]);
        let result = http.request("a", get(&format!("http://127.0.0.1:{port}/")));
        assert!(matches!(result, Err(HttpError::Transport(_))), "{result:?}");
    }
}
