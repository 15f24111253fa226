//! `HyperHttp` over HTTPS against a loopback TLS server whose certificate (for
//! `localhost`) is signed by the throw-away test CA in `plugins/email-smtp/tests/certs`.
#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use caremsg_plugin_host::{HttpError, HttpRequest, HyperHttp};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../email-smtp/tests/certs")
}

/// Starts a TLS server on 127.0.0.1 that answers every request with 200 "hello over
/// tls"; returns its port.
fn start_server(runtime: &tokio::runtime::Runtime) -> u16 {
    let chain = CertificateDer::pem_file_iter(certs().join("localhost.pem"))
        .expect("cert file")
        .collect::<Result<Vec<_>, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_file(certs().join("localhost.key")).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = runtime
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    runtime.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that does not trust us aborts the handshake: ignore it.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0_u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let body = b"hello over tls";
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(body).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn get(url: String) -> HttpRequest {
    HttpRequest {
        method: "GET".into(),
        url,
        headers: vec![],
        body: vec![],
        timeout: None,
    }
}

#[test]
fn https_with_the_private_ca_as_extra_root_succeeds() {
    let runtime = runtime();
    let port = start_server(&runtime);
    let ca = std::fs::read(certs().join("ca.pem")).expect("ca");
    let http = HyperHttp::new(runtime.handle().clone(), Duration::from_secs(5))
        .with_extra_roots(&ca)
        .expect("extra roots");
    http.set_allowed_hosts("portal", [format!("localhost:{port}")]);
    let response = http
        .request("portal", get(format!("https://localhost:{port}/hook")))
        .expect("https request");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello over tls");
}

#[test]
fn https_without_the_private_ca_is_a_clear_tls_error() {
    let runtime = runtime();
    let port = start_server(&runtime);
    let http = HyperHttp::new(runtime.handle().clone(), Duration::from_secs(5));
    http.set_allowed_hosts("portal", [format!("localhost:{port}")]);
    let result = http.request("portal", get(format!("https://localhost:{port}/hook")));
    let Err(HttpError::Transport(message)) = result else {
        panic!("expected a transport error, got {result:?}");
    };
    assert!(
        message.contains("certificate") && message.contains("UnknownIssuer"),
        "{message}"
    );
}
