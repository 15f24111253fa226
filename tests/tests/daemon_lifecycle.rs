//! The daemon as an operator sees it: health, readiness, metrics, the OpenAPI
//! document, configuration reload, and graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use caremsg_tests::{ADMIN_TOKEN, TestDaemon, practice_body};
use caremsgd::reload::ReloadOutcome;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn ops_endpoints_answer() {
    let d = TestDaemon::start().await.unwrap();
    let (status, body) = d.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, body) = d.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, doc) = d.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["paths"]["/v1/admin/patients/{patient_id}"]["put"].is_object(),
        "{doc}"
    );
    d.admin_put("/v1/admin/practices/p1", practice_body("p1"))
        .await;
    let (status, metrics) = d.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(metrics.contains("caremsg_writer_units_total"), "{metrics}");
    assert!(
        metrics.contains("caremsg_http_responses_total"),
        "{metrics}"
    );
    for gauge in [
        "caremsg_outbox_depth 0",
        "caremsg_timers_due 0",
        "caremsg_actors_live 0",
    ] {
        assert!(metrics.contains(gauge), "{gauge}: {metrics}");
    }
    d.stop().await.unwrap();
}

/// Adds a client `extra` with scope admin and token `extra-token` to a config text.
fn with_extra_client(text: &str) -> String {
    format!(
        "{text}\n[[clients]]\nname = \"extra\"\ntoken_sha256 = \"{}\"\nscopes = [\"admin\"]\n",
        caremsg_config::hash_token("extra-token")
    )
}

#[tokio::test]
async fn reload_applies_valid_changes_and_refuses_the_rest() {
    let d = TestDaemon::start().await.unwrap();
    let original = std::fs::read_to_string(&d.config_path).unwrap();
    let practice = practice_body("p1");

    // A new client becomes valid on reload.
    let (status, _) = d
        .call(
            Method::PUT,
            "/v1/admin/practices/p1",
            Some("extra-token"),
            Some(&practice),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    std::fs::write(&d.config_path, with_extra_client(&original)).unwrap();
    match d.daemon().reload() {
        ReloadOutcome::Applied(fields) => assert!(
            fields.iter().any(|f| f.starts_with("clients")),
            "{fields:?}"
        ),
        other => panic!("expected the reload to apply: {other:?}"),
    }
    let (status, _) = d
        .call(
            Method::PUT,
            "/v1/admin/practices/p1",
            Some("extra-token"),
            Some(&practice),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "the new client works after reload");

    // An invalid file is refused and the old configuration keeps serving.
    std::fs::write(&d.config_path, "this is = = not toml").unwrap();
    assert!(matches!(d.daemon().reload(), ReloadOutcome::Refused(_)));
    let (status, _) = d
        .call(
            Method::PUT,
            "/v1/admin/practices/p1",
            Some("extra-token"),
            Some(&practice),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "still serving on the previous configuration"
    );

    // A non-reloadable change is refused, naming the field, and nothing of that file
    // is applied (the extra client disappears only with a valid file).
    let moved = original.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    std::fs::write(&d.config_path, moved).unwrap();
    match d.daemon().reload() {
        ReloadOutcome::Refused(reason) => assert!(reason.contains("server.listen"), "{reason}"),
        other => panic!("expected a refusal: {other:?}"),
    }
    let (status, _) = d
        .call(
            Method::PUT,
            "/v1/admin/practices/p1",
            Some("extra-token"),
            Some(&practice),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the refused file's removal of the client was not applied"
    );

    // Back to the original: the extra client is gone; unchanged after that.
    std::fs::write(&d.config_path, &original).unwrap();
    assert!(matches!(d.daemon().reload(), ReloadOutcome::Applied(_)));
    let (status, _) = d
        .call(
            Method::PUT,
            "/v1/admin/practices/p1",
            Some("extra-token"),
            Some(&practice),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(d.daemon().reload(), ReloadOutcome::Unchanged);
    d.stop().await.unwrap();
}

async fn in_flight(d: &TestDaemon) -> i64 {
    let (_, metrics) = d.call(Method::GET, "/metrics", None, None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("caremsg_http_requests_in_flight "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn graceful_shutdown_finishes_an_in_flight_request() {
    let mut d = TestDaemon::start().await.unwrap();
    let body = serde_json::to_vec(&practice_body("p1")).unwrap();
    let (head, tail) = body.split_at(body.len() / 2);
    let addr = d.daemon().local_addr();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "PUT /v1/admin/practices/p1 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(head).await.unwrap();
    // The request is in flight once its handler runs (the /metrics request itself
    // counts as one more).
    let mut seen = false;
    for _ in 0..2_000 {
        if in_flight(&d).await >= 2 {
            seen = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(seen, "the half-sent request never reached its handler");

    let running = d.running.take().unwrap();
    let shutdown = tokio::spawn(running.shutdown());
    // New connections are refused once the listener is closed; the old one goes on.
    stream.write_all(tail).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    shutdown.await.unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown"
    );

    // What the in-flight request wrote is durable: a restart on the same database sees it.
    d.restart().await.unwrap();
    let (status, body) = d
        .admin_put(
            "/v1/admin/practices/p1/programs/ccm",
            serde_json::json!({"name": "CCM"}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the practice exists after restart: {body}"
    );
    let _: Value = body;
    d.stop().await.unwrap();
}
