//! The battery's loopback fake HTTP server: answers every request with the current
//! scripted response, so send-result mapping can be checked without a provider.

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

/// A running fake server (it lives as long as the runtime).
pub(crate) struct Fake {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// What it answers now.
    script: Arc<Mutex<FakeResponse>>,
    /// How many requests it answered.
    requests: Arc<AtomicU64>,
}

impl Fake {
    /// Binds `127.0.0.1:0` and serves on `runtime`.
    pub(crate) fn start(runtime: &Handle) -> std::io::Result<Fake> {
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let script = Arc::new(Mutex::new(FakeResponse {
            status: 200,
            ..FakeResponse::default()
        }));
        let requests = Arc::new(AtomicU64::new(0));
        let (serve_script, serve_requests) = (script.clone(), requests.clone());
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (script, requests) = (serve_script.clone(), serve_requests.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (script, requests) = (script.clone(), requests.clone());
                        async move {
                            // Read the whole request before answering, as a provider would.
                            let _ = request.into_body().collect().await;
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
        })
    }

    /// The base URL (`http://127.0.0.1:PORT`).
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes what it answers.
    pub(crate) fn set(&self, response: FakeResponse) {
        *self.script.lock().unwrap_or_else(PoisonError::into_inner) = response;
    }

    /// How many requests it answered so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
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
