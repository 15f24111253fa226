//! portal-webhook through the real host against a loopback fake portal backend: the
//! fake keeps each request, and the test checks it the way a portal backend would —
//! recomputing the HMAC-SHA256 over `"<timestamp>.<raw body>"` — then reads the JSON.

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use caremsg_plugin_host::{Outbound, SendOutcome};
use caremsg_plugin_testkit::fake::Received;
use caremsg_plugin_testkit::harness::Harness;
use caremsg_plugin_testkit::suite::FakeResponse;
use caremsg_testplugins::library_path;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const SECRET: &str = "portal-shared-secret-0123";

fn start(extra: &str) -> Harness {
    Harness::start(
        &library_path(env!("CARGO_PKG_NAME")).expect("built"),
        |fake| format!(r#"{{"url": "{fake}/caremsg/events", "secret": "{SECRET}"{extra}}}"#),
    )
    .expect("started")
}

fn outbound(to: &str, body: &str) -> Outbound {
    Outbound {
        delivery_id: "del-42".into(),
        to: to.into(),
        from: String::new(),
        body: body.into(),
        idempotency_key: "idem-42".into(),
        subject: None,
        attempt: 3,
    }
}

/// What a portal backend does with a push: check the signature over the raw body and
/// the timestamp's age, then parse the JSON.
fn verified(request: &Received) -> serde_json::Value {
    let timestamp = request.header("x-caremsg-timestamp").expect("timestamp");
    let signature = request.header("x-caremsg-signature").expect("signature");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&request.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(signature, expected, "signature");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let at: u64 = timestamp.parse().expect("Unix seconds");
    assert!(now.abs_diff(at) <= 300, "timestamp {at}, now {now}");
    serde_json::from_slice(&request.body).expect("JSON body")
}

#[test]
fn push_is_signed_json_with_the_delivery_headers() {
    let harness = start("");
    harness.fake().set(FakeResponse {
        status: 202,
        body: r#"{"id": "evt-1"}"#.into(),
        ..FakeResponse::default()
    });
    let outcome = harness
        .instance()
        .send(&outbound("patient-7", "Your results are in."))
        .expect("called");
    assert_eq!(
        outcome,
        SendOutcome::Sent {
            provider_id: "evt-1".into()
        }
    );
    let received = harness.fake().received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(
        (request.method.as_str(), request.path_and_query.as_str()),
        ("POST", "/caremsg/events")
    );
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("idempotency-key"), Some("idem-42"));
    assert_eq!(request.header("x-caremsg-delivery"), Some("del-42"));
    // By default the push carries no text: the portal fetches the conversation.
    assert_eq!(
        verified(request),
        serde_json::json!({"event": "message", "patient_id": "patient-7",
            "delivery_id": "del-42", "attempt": 3})
    );
    let logs = harness.logs();
    assert!(
        logs.iter()
            .all(|(_, l)| !l.contains("patient-7") && !l.contains("results")),
        "{logs:?}"
    );
}

#[test]
fn a_json_body_carries_the_events_fields_and_text_is_opt_in() {
    let harness = start(r#", "include_body": true, "event": "staff_message""#);
    harness.fake().set(FakeResponse {
        status: 200,
        ..FakeResponse::default()
    });
    let send = |message: &Outbound| {
        harness.instance().send(message).expect("called");
        let received = harness.fake().received();
        verified(received.last().expect("a request"))
    };
    assert_eq!(
        send(&outbound(
            "patient-7",
            r#"{"seq": 12, "direction": "to_patient", "channel": "portal"}"#
        )),
        serde_json::json!({"event": "staff_message", "patient_id": "patient-7", "seq": 12,
            "direction": "to_patient", "channel": "portal", "delivery_id": "del-42", "attempt": 3})
    );
    let mut with_subject = outbound("patient-7", "See you at 10.");
    with_subject.subject = Some("Appointment".into());
    assert_eq!(
        send(&with_subject),
        serde_json::json!({"event": "staff_message", "patient_id": "patient-7",
            "body": "See you at 10.", "subject": "Appointment", "delivery_id": "del-42", "attempt": 3})
    );
}

#[test]
fn answers_map_to_outcomes() {
    let harness = start("");
    let send = |status: u16, retry_after: Option<&str>| {
        harness.fake().set(FakeResponse {
            status,
            headers: retry_after
                .map(|r| [("retry-after".to_owned(), r.to_owned())].into())
                .unwrap_or_default(),
            body: String::new(),
        });
        harness
            .instance()
            .send(&outbound("patient-7", "x"))
            .expect("called")
    };
    assert_eq!(
        send(429, Some("12")),
        SendOutcome::Retryable {
            after: Some(Duration::from_secs(12)),
            code: Some("429".into()),
            reason: "The portal answered HTTP 429: try again later.".into()
        }
    );
    assert!(matches!(send(500, None), SendOutcome::Retryable { code: Some(c), .. } if c == "500"));
    assert!(matches!(send(404, None), SendOutcome::Permanent { code, .. } if code == "404"));
    assert!(
        matches!(send(204, None), SendOutcome::Sent { provider_id } if provider_id == "del-42")
    );
    let outcome = harness
        .instance()
        .send(&outbound("", "not json"))
        .expect("called");
    assert!(
        matches!(&outcome, SendOutcome::Permanent { code, .. } if code == "no-patient"),
        "{outcome:?}"
    );
}

#[test]
fn an_unreachable_portal_is_retryable() {
    let harness = Harness::start(
        &library_path(env!("CARGO_PKG_NAME")).expect("built"),
        // Not the fake: the daemon's allow-list refuses it, as a dead network would.
        |_| format!(r#"{{"url": "http://127.0.0.1:9/events", "secret": "{SECRET}"}}"#),
    )
    .expect("started");
    let outcome = harness
        .instance()
        .send(&outbound("patient-7", "x"))
        .expect("called");
    assert!(
        matches!(&outcome, SendOutcome::Retryable { code: Some(c), .. } if c == "unreachable"),
        "{outcome:?}"
    );
}
