//! The conformance battery (`caremsg-plugin-testkit`) against the built `.so`, sending
//! to a real SMTP server on loopback ([`support`]); the suite is built here because
//! the server's port is only known at run time.

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

mod support;

use caremsg_plugin_testkit::{Suite, run};
use caremsg_testplugins::library_path;
use support::{Script, Security, SmtpServer};

#[test]
fn email_smtp_passes_the_battery() {
    let server = SmtpServer::start(Security::Plain, Script::default());
    let suite = Suite::from_json(&format!(
        r#"{{
            "config": {{"host": "127.0.0.1", "port": {}, "security": "none",
                        "from": "care@sunrise.example", "timeout_secs": 20}},
            "outbound": {{"to": "pat@example.org", "from": "care@sunrise.example",
                          "subject": "Your appointment", "body": "See you on Tuesday at 10."}},
            "send": [{{"name": "accepted by the SMTP server", "expect": "sent"}}],
            "webhooks": [{{"name": "no webhooks (404)", "expect_status": 404}}]
        }}"#,
        server.addr.port()
    ))
    .expect("valid suite");
    let library = library_path(env!("CARGO_PKG_NAME")).expect("built");
    let mut out = Vec::new();
    let report = run(&library, &suite, &mut out).expect("the battery runs");
    let out = String::from_utf8(out).expect("UTF-8 output");
    assert_eq!(report.failed(), 0, "{out}");
    for check in [
        "send maps accepted by the SMTP server",
        "200 concurrent sends",
        "logs hold no PHI",
        "adversarial inputs",
        "no emit after stop",
    ] {
        assert!(
            report.check(check).is_some_and(|c| c.passed),
            "{check}: {out}"
        );
    }
    // 1 + 200 concurrent + the sends of the back-pressure and adversarial checks that
    // have a valid recipient.
    let received = server.received();
    assert!(received.len() >= 201, "{}", received.len());
    assert!(received.iter().all(|m| m.to == ["pat@example.org"]));
}
