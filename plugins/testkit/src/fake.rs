//! The battery's loopback fake HTTP server: answers every request with the current
//! scripted response, so send-result mapping can be checked without a provider. It
//! also keeps every request it received, so a plugin's own tests can check the wire
//! format (see [`crate::harness`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::runtime::Handle;

use crate::suite::FakeResponse;

/// A request the fake received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// Method, upper case.
    pub method: String,
    /// Path and query, as sent.
    pub path_and_query: String,
    /// Headers, names lower-case, values lossily made UTF-8.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Received {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A running fake server (it lives as long as the runtime).
pub struct Fake {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it answers now.
    script: Arc<Mutex<FakeResponse>>,
    /// How many requests it answered.
    requests: Arc<AtomicU64>,
    /// Every request, in the order they were answered.
    received: Arc<Mutex<Vec<Received>>>,
}

impl Fake {
    /// Binds `127.0.0.1:0` and serves on `runtime`.
    pub fn start(runtime: &Handle) -> std::io::Result<Fake> {
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let script = Arc::new(Mutex::new(FakeResponse {
            status: 200,
            ..FakeResponse::default()
        }));
        let requests = Arc::new(AtomicU64::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (serve_script, serve_requests, serve_received) =
            (script.clone(), requests.clone(), received.clone());
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (script, requests, received) = (
                    serve_script.clone(),
                    serve_requests.clone(),
                    serve_received.clone(),
                );
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (script, requests, received) =
                            (script.clone(), requests.clone(), received.clone());
                        async move {
                            // Read the whole request before answering, as a provider would.
                            let (parts, body) = request.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            received
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(Received {
                                    method: parts.method.to_string(),
                                    path_and_query: parts
                                        .uri
                                        .path_and_query()
                                        .map(ToString::to_string)
                                        .unwrap_or_default(),
                                    headers: parts
                                        .headers
                                        .iter()
                                        .map(|(n, v)| {
                                            (
                                                n.as_str().to_owned(),
                                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                            )
                                        })
                                        .collect(),
                                    body,
                                });
                            let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
                            let current = script
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .clone();
                            Ok::<_, Infallible>(respond(&current, n))
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Fake {
            addr,
            script,
            requests,
            received,
        })
    }

    /// The base URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes what it answers.
    pub fn set(&self, response: FakeResponse) {
        *self.script.lock().unwrap_or_else(PoisonError::into_inner) = response;
    }

    /// How many requests it answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Every request it answered so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Forgets the requests received so far.
    pub fn clear_received(&self) {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// The scripted response; `${N}` in its body becomes the request's sequence number,
/// so providers' ids can be unique.
fn respond(script: &FakeResponse, n: u64) -> Response<Full<Bytes>> {
    let body = script.body.replace("${N}", &n.to_string());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(script.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in &script.headers {
        if let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(name.as_bytes()),
            hyper::header::HeaderValue::from_str(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}
