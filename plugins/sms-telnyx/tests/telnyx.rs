//! sms-telnyx through the real host against the testkit's loopback fake: the JSON
//! request and Bearer key of a send, the mapping of Telnyx's answers, health after a
//! refused key, and webhooks with fresh, stale and forged Ed25519 signatures.

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::time::{SystemTime, UNIX_EPOCH};

use caremsg_plugin_host::{Event, Health, Outbound, ReceiptStatus, SendOutcome, WebhookRequest};
use caremsg_plugin_testkit::harness::Harness;
use caremsg_plugin_testkit::suite::FakeResponse;
use caremsg_sms_telnyx::map_answer;
use caremsg_testplugins::library_path;

/// The committed suite's key pair (`testkit.json`).
const SEED: &str = "0mGkzSoPb21EyARuo37yAAN/R0g6hknk5kajZfe/Y1U=";
const PUBLIC: &str = "1x0UlweKTkM7X8ANfr05b0tSO+V+dCkCFMK0b4Gro14=";

fn start() -> Harness {
    Harness::start(&library_path(env!("CARGO_PKG_NAME")).expect("built"), |fake| {
        format!(
            r#"{{"api_key": "KEY1", "public_key": "{PUBLIC}", "from": "+15550199", "base_url": "{fake}"}}"#
        )
    })
    .expect("started")
}

fn outbound() -> Outbound {
    Outbound {
        delivery_id: "d-1".into(),
        to: "+15550100".into(),
        from: String::new(),
        body: "Hello".into(),
        idempotency_key: "k-1".into(),
        subject: None,
        attempt: 1,
    }
}

fn answer(status: u16, body: &str) -> FakeResponse {
    FakeResponse {
        status,
        body: body.to_owned(),
        ..FakeResponse::default()
    }
}

#[test]
fn a_send_posts_json_with_the_bearer_key_and_the_hook_url() {
    let h = start();
    h.fake().set(answer(200, r#"{"data":{"id":"m-1"}}"#));
    let outcome = h.instance().send(&outbound()).unwrap();
    assert_eq!(outcome, SendOutcome::sent("m-1"));
    let got = h.fake().received().pop().unwrap();
    assert_eq!(
        (got.method.as_str(), got.path_and_query.as_str()),
        ("POST", "/v2/messages")
    );
    assert_eq!(got.header("authorization"), Some("Bearer KEY1"));
    let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(
        body["from"], "+15550199",
        "the configured sender fills an empty from"
    );
    assert_eq!(body["to"], "+15550100");
    assert_eq!(body["text"], "Hello");
    assert_eq!(
        body["webhook_url"],
        "http://127.0.0.1:8080/v1/hooks/testkit"
    );
    assert!(h.logs().iter().all(|(_, line)| !line.contains("+1555")));
}

#[test]
fn a_refused_key_turns_health_down_until_a_send_succeeds() {
    let h = start();
    assert_eq!(h.instance().health().unwrap(), Health::Ok);
    h.fake().set(answer(
        401,
        r#"{"errors":[{"code":"10009","title":"Authentication failed"}]}"#,
    ));
    let outcome = h.instance().send(&outbound()).unwrap();
    assert!(
        matches!(outcome, SendOutcome::Permanent { ref code, .. } if code == "10009"),
        "{outcome:?}"
    );
    assert!(matches!(h.instance().health().unwrap(), Health::Down(_)));
    h.fake().set(answer(200, r#"{"data":{"id":"m-2"}}"#));
    h.instance().send(&outbound()).unwrap();
    assert_eq!(h.instance().health().unwrap(), Health::Ok);
}

#[test]
fn answers_map_to_send_results() {
    use std::time::Duration;
    let retry = map_answer(429, Some("7"), br#"{"errors":[{"code":"10011"}]}"#);
    assert_eq!(
        retry,
        SendOutcome::Retryable {
            after: Some(Duration::from_secs(7)),
            code: Some("10011".into()),
            reason: "Telnyx answered HTTP 429 with error 10011: no detail".into()
        }
    );
    let stop = map_answer(
        400,
        None,
        br#"{"errors":[{"code":"40300","detail":"+15550100 replied STOP"}]}"#,
    );
    assert!(
        matches!(stop, SendOutcome::Unsubscribed { ref reason } if !reason.contains("15550100")),
        "{stop:?}"
    );
    assert!(
        matches!(map_answer(502, None, b"<html>"), SendOutcome::Retryable { code: Some(ref c), .. } if c == "502")
    );
    assert!(
        matches!(map_answer(422, None, br#"{"errors":[{"code":40310}]}"#), SendOutcome::Permanent { ref code, .. } if code == "40310")
    );
    assert!(
        matches!(map_answer(200, None, b"{}"), SendOutcome::Permanent { ref code, .. } if code == "telnyx-malformed-response")
    );
}

/// A webhook signed the way Telnyx signs, built by the testkit's signer.
fn signed(ts: u64, body: &str, seed: &str) -> WebhookRequest {
    let case = serde_json::json!({
        "name": "x", "expect_status": 200, "timestamp": ts.to_string(), "body": body,
        "headers": {"telnyx-timestamp": "${TS}"},
        "sign": {"algorithm": "ed25519", "key": seed, "message": "${TS}|${BODY}", "header": "telnyx-signature-ed25519"}
    });
    let suite = serde_json::json!({"config": {}, "webhooks": [case]});
    let suite = caremsg_plugin_testkit::Suite::from_json(&suite.to_string()).unwrap();
    caremsg_plugin_testkit::webhook_request(&suite.webhooks[0]).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

const FINALIZED: &str = r#"{"data":{"event_type":"message.finalized","payload":{"id":"m-9","to":[{"phone_number":"+15550100","status":"delivery_failed"}],"errors":[{"code":"40300"}]}}}"#;

#[test]
fn webhooks_are_verified_fresh_and_mapped() {
    let h = start();
    let outcome = h
        .instance()
        .handle_webhook(&signed(now(), FINALIZED, SEED))
        .unwrap();
    assert_eq!(outcome.response.status, 200);
    assert_eq!(
        outcome.events,
        vec![
            Event::DeliveryReceipt {
                provider_message_id: "m-9".into(),
                status: ReceiptStatus::Undelivered,
                error_code: Some("40300".into())
            },
            Event::OptOut {
                number: "+15550100".into()
            }
        ]
    );
    for (request, why) in [
        (signed(now() - 301, FINALIZED, SEED), "stale"),
        (signed(now() + 301, FINALIZED, SEED), "ahead"),
        (
            signed(
                now(),
                FINALIZED,
                "CfUdD6AFkdKAxpUcpcWSFj+MFG9fEhYXPqeRuVPVD6I=",
            ),
            "other key",
        ),
    ] {
        let outcome = h.instance().handle_webhook(&request).unwrap();
        assert_eq!(
            (outcome.response.status, outcome.events.len()),
            (403, 0),
            "{why}"
        );
    }
    let mut tampered = signed(now(), FINALIZED, SEED);
    tampered.body = FINALIZED.replace("m-9", "m-8").into_bytes();
    assert_eq!(
        h.instance()
            .handle_webhook(&tampered)
            .unwrap()
            .response
            .status,
        403
    );
}
