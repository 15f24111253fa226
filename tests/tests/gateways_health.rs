//! Gateway plugin health, end to end with a real plugin library built against the SDK
//! frozen at ABI 1.0 (`plugins/testplugins/abi-v1_0`): today's daemon loads it, takes
//! its webhooks, polls its health into `caremsg_gateway_health{gateway}` and
//! `/readyz`, and (only with `down_fails_readiness`) turns readiness to 503 while it is
//! down. The plugin is down while a file says so.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use caremsg_tests::TestDaemon;
use reqwest::StatusCode;
use serde_json::{Value, json};

const GAUGE: &str = "caremsg_gateway_health{gateway=\"v10\"}";

/// A daemon with one more gateway, `v10`, whose health follows the returned file (in
/// the returned folder, which must outlive the test).
async fn daemon(extra: &str) -> (TestDaemon, PathBuf, tempfile::TempDir) {
    let library = caremsg_testplugins::library_path(caremsg_testplugins::ABI_V1_0).unwrap();
    let folder = tempfile::tempdir().unwrap();
    let file = folder.path().join("v10-health");
    let table = format!(
        "\n[[gateways]]\nname = \"v10\"\nkind = \"sms\"\nlibrary = {:?}\n{extra}\n[gateways.config]\nhealth_file = {:?}\n",
        library.display().to_string(),
        file.display().to_string()
    );
    let d = TestDaemon::start_with(move |text| format!("{text}{table}"))
        .await
        .unwrap();
    (d, file, folder)
}

async fn readyz(d: &TestDaemon) -> (StatusCode, Value) {
    let response = d
        .http
        .get(format!("{}/readyz", d.base))
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

fn set_health(file: &Path, text: &str) {
    std::fs::write(file, text).unwrap();
}

#[tokio::test]
async fn an_abi_1_0_plugin_loads_takes_webhooks_and_reports_its_health() {
    let (d, file, _folder) = daemon("").await;
    let plugin = d
        .daemon()
        .state()
        .gateways
        .instance("v10")
        .unwrap()
        .plugin()
        .clone();
    assert_eq!(
        (plugin.metadata().abi_major, plugin.metadata().abi_minor),
        (1, 0)
    );

    // Its webhook works through the daemon: the event is committed, then 204.
    let response = d
        .http
        .post(format!("{}/v1/hooks/v10", d.base))
        .json(&json!({"from": "+12015550123", "to": "+12015550100", "body": "hello", "id": "v10-in-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    d.daemon().poll_gateway_health().await;
    assert_eq!(d.metric(GAUGE).await, 2.0);
    let (status, body) = readyz(&d).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["gateways"]["v10"], json!({"health": "ok"}));

    // Down: reported, but readiness stays (down_fails_readiness defaults to false).
    set_health(&file, "down");
    d.daemon().poll_gateway_health().await;
    assert_eq!(d.metric(GAUGE).await, 0.0);
    let (status, body) = readyz(&d).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["gateways"]["v10"]["health"], "down");
    assert_eq!(
        body["gateways"]["v10"]["detail"],
        "The health file says down."
    );
    assert_eq!(body["gateways"]["loopback"]["health"], "ok");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn with_down_fails_readiness_a_down_gateway_makes_the_daemon_unready() {
    let (d, file, _folder) = daemon("down_fails_readiness = true").await;
    set_health(&file, "down");
    d.daemon().poll_gateway_health().await;
    let (status, body) = readyz(&d).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["reason"], "gateway v10 reports itself down");
    set_health(&file, "up");
    d.daemon().poll_gateway_health().await;
    let (status, body) = readyz(&d).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["gateways"]["v10"]["health"], "ok");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn health_is_polled_every_health_interval_without_being_asked() {
    let (d, file, _folder) = daemon("health_interval = \"1s\"").await;
    set_health(&file, "down");
    // Bounded polling of the observable gauge: the daemon's own poll must change it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.metric(GAUGE).await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the gauge never showed the plugin down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    set_health(&file, "up");
    while d.metric(GAUGE).await != 2.0 {
        assert!(
            Instant::now() < deadline,
            "the gauge never showed the plugin up again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.stop().await.unwrap();
}
