//! PHI never reaches the log: the admin API is driven with canary values (valid and
//! invalid), with every log level on, and the captured log output must not contain
//! any of them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::io::Write;
use std::sync::{Arc, Mutex};

use caremsg_tests::{ADMIN_TOKEN, TestDaemon};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

const FIRST: &str = "Zyxwvutsrq";
const LAST: &str = "Qponmlkjih";
const DOB: &str = "1937-06-23";
const PHONE_NATIONAL: &str = "2015550177";
const PHONE_E164: &str = "+12015550177";

#[tokio::test]
async fn canary_phi_never_appears_in_logs() {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(capture.clone())
        .with_ansi(false)
        .init();

    let d = TestDaemon::start().await.unwrap();
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    let good = json!({
        "practice_id": "p1", "first_name": FIRST, "last_name": LAST, "date_of_birth": DOB,
        "mobile_phone": PHONE_NATIONAL, "portal_enrolled": true, "programs": [], "care_team": ["u1"],
    });
    let (status, body) = d.admin_put("/v1/admin/patients/canary", good.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Error paths: every field wrong in turn, and a mistyped value.
    for (key, value) in [
        ("date_of_birth", json!("1937-02-30")),
        ("mobile_phone", json!(format!("{PHONE_NATIONAL}9"))),
        ("first_name", json!(12345)),
        ("last_name", json!([LAST])),
        ("care_team", json!([FIRST])),
    ] {
        let mut bad = good.clone();
        bad[key] = value;
        let (status, body) = d.admin_put("/v1/admin/patients/canary", bad).await;
        assert!(status.is_client_error(), "{key}: {body}");
        let text = body.to_string();
        for canary in [FIRST, LAST, DOB, PHONE_NATIONAL, PHONE_E164] {
            assert!(
                !text.contains(canary),
                "the error for {key} echoes PHI: {text}"
            );
        }
    }
    let (status, _) = d
        .call(
            Method::DELETE,
            "/v1/admin/patients/canary",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    d.stop().await.unwrap();

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("caremsgd is serving"),
        "the capture works: {logs}"
    );
    // Each line without its timestamp and sqlx's timings (`elapsed=193.714µs`):
    // numbers that can hold the canary year by chance.
    let scrubbed: Vec<String> = logs
        .lines()
        .map(|line| {
            line.split_whitespace()
                .skip(1)
                .filter(|token| !token.starts_with("elapsed"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    for canary in [FIRST, LAST, DOB, PHONE_NATIONAL, PHONE_E164, "1937"] {
        let lines: Vec<&String> = scrubbed.iter().filter(|l| l.contains(canary)).collect();
        assert!(
            lines.is_empty(),
            "PHI canary {canary:?} appeared in the log output: {lines:?}"
        );
    }
}
