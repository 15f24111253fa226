//! sms-twilio through the real host against a loopback fake that speaks Twilio's
//! format: the form and basic authentication of a send, the mapping of Twilio's
//! answers (opt-out 21610, 429 with `Retry-After`, refused credentials), inbound texts
//! and status callbacks with valid signatures, and the refusal of everything else.

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::collections::BTreeMap;
use std::time::Duration;

use caremsg_plugin_host::{Event, Health, Outbound, ReceiptStatus, SendOutcome, WebhookRequest};
use caremsg_plugin_testkit::harness::Harness;
use caremsg_plugin_testkit::suite::FakeResponse;
use caremsg_sms_twilio::signature::sign;
use caremsg_testplugins::library_path;

const TOKEN: &str = "test-auth-token";
const HOOK: &str = "https://clinic.example/v1/hooks/twilio";

fn start(extra: &str) -> Harness {
    Harness::start(
        &library_path(env!("CARGO_PKG_NAME")).expect("built"),
        |fake| {
            format!(
                r#"{{"account_sid": "ACtest", "auth_token": "{TOKEN}", "base_url": "{fake}"{extra}}}"#
            )
        },
    )
    .expect("started")
}

fn with_sender() -> Harness {
    start(&format!(
        r#", "from": "+15550199", "status_callback": true, "hook_url": "{HOOK}""#
    ))
}

fn outbound(to: &str, from: &str, body: &str) -> Outbound {
    Outbound {
        delivery_id: "d-1".into(),
        to: to.into(),
        from: from.into(),
        body: body.into(),
        idempotency_key: "k-1".into(),
        subject: None,
        attempt: 1,
    }
}

fn answer(status: u16, body: &str, headers: &[(&str, &str)]) -> FakeResponse {
    FakeResponse {
        status,
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
        body: body.to_owned(),
    }
}

fn created(sid: &str) -> FakeResponse {
    answer(
        201,
        &format!(r#"{{"sid": "{sid}", "status": "queued", "error_code": null}}"#),
        &[("content-type", "application/json")],
    )
}

fn form(body: &[u8]) -> BTreeMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

#[test]
fn send_posts_twilios_form_with_basic_auth() {
    let harness = with_sender();
    harness.fake().set(created("SM0001"));
    let outcome = harness
        .instance()
        .send(&outbound("+15550100", "", "Hi & welcome: 100% ✓"))
        .expect("called");
    assert_eq!(
        outcome,
        SendOutcome::Sent {
            provider_id: "SM0001".into()
        }
    );
    let received = harness.fake().received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(request.method, "POST");
    assert_eq!(
        request.path_and_query,
        "/2010-04-01/Accounts/ACtest/Messages.json"
    );
    // base64("ACtest:test-auth-token")
    assert_eq!(
        request.header("authorization"),
        Some("Basic QUN0ZXN0OnRlc3QtYXV0aC10b2tlbg==")
    );
    assert_eq!(
        request.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let fields = form(&request.body);
    let expected: BTreeMap<String, String> = [
        ("To", "+15550100"),
        ("From", "+15550199"),
        ("Body", "Hi & welcome: 100% ✓"),
        ("StatusCallback", HOOK),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(fields, expected);

    // A sender given by the daemon wins over the configured one.
    harness.fake().set(created("SM0002"));
    harness
        .instance()
        .send(&outbound("+15550100", "+15550111", "x"))
        .expect("called");
    let received = harness.fake().received();
    assert_eq!(
        form(&received[1].body).get("From").map(String::as_str),
        Some("+15550111")
    );
    let logs = harness.logs();
    assert!(
        logs.iter()
            .all(|(_, line)| !line.contains("1555") && !line.contains("welcome")),
        "{logs:?}"
    );
}

#[test]
fn messaging_service_replaces_from_and_callbacks_are_optional() {
    let harness = start(r#", "messaging_service_sid": "MG0001""#);
    harness.fake().set(created("SM0003"));
    harness
        .instance()
        .send(&outbound("+15550100", "", "x"))
        .expect("called");
    let fields = form(&harness.fake().received()[0].body);
    assert_eq!(
        fields.get("MessagingServiceSid").map(String::as_str),
        Some("MG0001")
    );
    assert!(!fields.contains_key("From"), "{fields:?}");
    assert!(!fields.contains_key("StatusCallback"), "{fields:?}");
}

#[test]
fn twilios_errors_map_to_outcomes() {
    let harness = with_sender();
    let error = |code: u32, status: u16| {
        format!(
            r#"{{"code": {code}, "message": "Attempt to send to unsubscribed recipient +15550100", "more_info": "https://www.twilio.com/docs/errors/{code}", "status": {status}}}"#
        )
    };
    let send = |response: FakeResponse| {
        harness.fake().set(response);
        harness
            .instance()
            .send(&outbound("+15550100", "", "x"))
            .expect("called")
    };

    // Opt-out: the daemon records it from this outcome.
    let outcome = send(answer(400, &error(21610, 400), &[]));
    assert!(
        matches!(&outcome, SendOutcome::Unsubscribed { reason } if !reason.contains("1555")),
        "{outcome:?}"
    );

    let outcome = send(answer(429, &error(20429, 429), &[("retry-after", "5")]));
    assert_eq!(
        outcome,
        SendOutcome::Retryable {
            after: Some(Duration::from_secs(5)),
            code: Some("20429".into()),
            reason: "Twilio answered HTTP 429 with error 20429: Attempt to send to unsubscribed \
                     recipient [redacted]"
                .into()
        }
    );

    let outcome = send(answer(502, "<html>bad gateway</html>", &[]));
    assert!(
        matches!(&outcome, SendOutcome::Retryable { code: Some(c), .. } if c == "502"),
        "{outcome:?}"
    );

    for code in [21211, 21612, 21614, 30004, 30005, 30006, 30007, 21408] {
        let outcome = send(answer(400, &error(code, 400), &[]));
        assert!(
            matches!(&outcome, SendOutcome::Permanent { code: c, reason } if *c == code.to_string() && !reason.contains("1555")),
            "{code}: {outcome:?}"
        );
    }
}

#[test]
fn refused_credentials_show_in_health_until_a_send_succeeds() {
    let harness = with_sender();
    assert_eq!(harness.instance().health().expect("called"), Health::Ok);
    harness.fake().set(answer(
        401,
        r#"{"code": 20003, "message": "Authenticate", "status": 401}"#,
        &[],
    ));
    let outcome = harness
        .instance()
        .send(&outbound("+15550100", "", "x"))
        .expect("called");
    assert!(
        matches!(&outcome, SendOutcome::Permanent { code, .. } if code == "20003"),
        "{outcome:?}"
    );
    assert!(matches!(
        harness.instance().health().expect("called"),
        Health::Down(_)
    ));
    harness.fake().set(created("SM0004"));
    harness
        .instance()
        .send(&outbound("+15550100", "", "x"))
        .expect("called");
    assert_eq!(harness.instance().health().expect("called"), Health::Ok);
}

#[test]
fn an_unreachable_api_is_retryable() {
    // The harness lets the instance reach only its fake: any other host is refused by
    // the daemon's HTTP service, as a network failure would be.
    let harness = Harness::start(
        &library_path(env!("CARGO_PKG_NAME")).expect("built"),
        |_| {
            format!(
                r#"{{"account_sid": "ACtest", "auth_token": "{TOKEN}", "from": "+1", "base_url": "http://127.0.0.1:9"}}"#
            )
        },
    )
    .expect("started");
    let outcome = harness
        .instance()
        .send(&outbound("+15550100", "", "x"))
        .expect("called");
    assert!(
        matches!(&outcome, SendOutcome::Retryable { code: Some(c), .. } if c == "unreachable"),
        "{outcome:?}"
    );
}

fn webhook(public_url: &str, body: &str, signature: Option<&str>) -> WebhookRequest {
    let mut headers = vec![(
        "content-type".to_owned(),
        b"application/x-www-form-urlencoded".to_vec(),
    )];
    if let Some(signature) = signature {
        headers.push((
            "x-twilio-signature".to_owned(),
            signature.as_bytes().to_vec(),
        ));
    }
    WebhookRequest {
        method: "POST".into(),
        public_url: public_url.into(),
        remote_addr: "203.0.113.7:443".parse().ok(),
        headers,
        body: body.as_bytes().to_vec(),
    }
}

fn signed(url: &str, body: &str) -> String {
    let params: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    sign(TOKEN, url, &params).expect("signed")
}

const INBOUND: &str = "ToCountry=US&SmsMessageSid=SMin1&NumMedia=0&SmsSid=SMin1&SmsStatus=received\
    &Body=YES%2C+I%27ll+come&To=%2B15550199&NumSegments=1&MessageSid=SMin1&AccountSid=ACtest\
    &From=%2B15550100&ApiVersion=2010-04-01";

#[test]
fn signed_inbound_text_is_emitted_and_answered_with_empty_twiml() {
    let harness = with_sender();
    let outcome = harness
        .instance()
        .handle_webhook(&webhook(HOOK, INBOUND, Some(&signed(HOOK, INBOUND))))
        .expect("called");
    assert_eq!(outcome.response.status, 200);
    assert_eq!(
        outcome
            .response
            .headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .map(|(_, v)| v.as_str()),
        Some("text/xml")
    );
    let twiml = String::from_utf8(outcome.response.body.clone()).expect("UTF-8");
    assert!(twiml.ends_with("<Response/>"), "{twiml}");
    assert_eq!(
        outcome.events,
        vec![Event::InboundMessage {
            from: "+15550100".into(),
            to: "+15550199".into(),
            body: "YES, I'll come".into(),
            provider_message_id: "SMin1".into(),
        }]
    );
}

#[test]
fn status_callbacks_become_receipts_and_21610_an_opt_out() {
    let harness = with_sender();
    let call = |body: &str| {
        harness
            .instance()
            .handle_webhook(&webhook(HOOK, body, Some(&signed(HOOK, body))))
            .expect("called")
    };
    let delivered = call(
        "SmsSid=SM1&SmsStatus=delivered&MessageStatus=delivered&To=%2B15550100&MessageSid=SM1\
         &AccountSid=ACtest&From=%2B15550199&ApiVersion=2010-04-01",
    );
    assert_eq!(delivered.response.status, 204);
    assert_eq!(
        delivered.events,
        vec![Event::DeliveryReceipt {
            provider_message_id: "SM1".into(),
            status: ReceiptStatus::Delivered,
            error_code: None,
        }]
    );
    let undelivered = call(
        "MessageStatus=undelivered&ErrorCode=30005&To=%2B15550100&MessageSid=SM2&AccountSid=ACtest",
    );
    assert_eq!(
        undelivered.events,
        vec![Event::DeliveryReceipt {
            provider_message_id: "SM2".into(),
            status: ReceiptStatus::Undelivered,
            error_code: Some("30005".into()),
        }]
    );
    let opted_out = call(
        "MessageStatus=failed&ErrorCode=21610&To=%2B15550100&MessageSid=SM3&AccountSid=ACtest",
    );
    assert_eq!(
        opted_out.events,
        vec![
            Event::DeliveryReceipt {
                provider_message_id: "SM3".into(),
                status: ReceiptStatus::Failed,
                error_code: Some("21610".into()),
            },
            Event::OptOut {
                number: "+15550100".into()
            },
        ]
    );
    let queued = call("MessageStatus=queued&MessageSid=SM4&AccountSid=ACtest");
    assert_eq!((queued.response.status, queued.events.len()), (204, 0));
}

#[test]
fn signatures_are_checked_with_and_without_the_default_port() {
    let harness = with_sender();
    let status = |public_url: &str, body: &str, signature: Option<&str>| {
        let outcome = harness
            .instance()
            .handle_webhook(&webhook(public_url, body, signature))
            .expect("called");
        (outcome.response.status, outcome.events.len())
    };
    let good = signed(HOOK, INBOUND);
    // Twilio signed the URL without the port; the daemon's public URL names :443.
    assert_eq!(
        status(
            "https://clinic.example:443/v1/hooks/twilio",
            INBOUND,
            Some(&good)
        ),
        (200, 1)
    );
    // And the other way round.
    let with_port = signed("https://clinic.example:443/v1/hooks/twilio", INBOUND);
    assert_eq!(status(HOOK, INBOUND, Some(&with_port)), (200, 1));

    let tampered = INBOUND.replace("YES", "NO");
    let refused = [
        status(HOOK, INBOUND, None),
        status(HOOK, INBOUND, Some("")),
        status(HOOK, &tampered, Some(&good)),
        status(
            "http://clinic.example/v1/hooks/twilio",
            INBOUND,
            Some(&good),
        ),
        status(
            "https://clinic.example:8443/v1/hooks/twilio",
            INBOUND,
            Some(&good),
        ),
        status(&format!("{HOOK}?x=1"), INBOUND, Some(&good)),
        status(HOOK, INBOUND, Some(&good.to_lowercase())),
    ];
    assert_eq!(refused, [(403, 0); 7]);

    // Signed with another account's token.
    let params: Vec<(String, String)> = form_urlencoded::parse(INBOUND.as_bytes())
        .into_owned()
        .collect();
    let foreign = sign("another-token", HOOK, &params).expect("signed");
    assert_eq!(status(HOOK, INBOUND, Some(&foreign)), (403, 0));
}
