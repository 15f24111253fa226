//! email-smtp through the real host against a real SMTP server on loopback
//! ([`support`]): what the server received (envelope, headers, body), STARTTLS and
//! implicit TLS with authentication, and how refusals map (451 retryable, 550
//! permanent, bad credentials, untrusted certificates, no STARTTLS, no server).

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

mod support;

use std::net::TcpListener;

use caremsg_plugin_host::{Health, Outbound, SendOutcome};
use caremsg_plugin_testkit::harness::Harness;
use caremsg_testplugins::library_path;
use support::{Script, Security, SmtpServer, certs};

fn start(config: String) -> Harness {
    Harness::start(
        &library_path(env!("CARGO_PKG_NAME")).expect("built"),
        |_| config,
    )
    .expect("started")
}

fn plain(server: &SmtpServer) -> Harness {
    start(format!(
        r#"{{"host": "127.0.0.1", "port": {}, "security": "none",
            "from": "Sunrise Clinic <care@sunrise.example>", "hello_name": "caremsg.test"}}"#,
        server.addr.port()
    ))
}

fn outbound(to: &str, subject: Option<&str>, body: &str) -> Outbound {
    Outbound {
        delivery_id: "del-1".into(),
        to: to.into(),
        from: String::new(),
        body: body.into(),
        idempotency_key: "idem-1".into(),
        subject: subject.map(str::to_owned),
        attempt: 1,
    }
}

#[test]
fn the_server_receives_envelope_headers_and_body() {
    let server = SmtpServer::start(Security::Plain, Script::default());
    let harness = plain(&server);
    let outcome = harness
        .instance()
        .send(&outbound(
            "pat@example.org",
            Some("Your appointment"),
            "See you on Tuesday at 10.\n.\nA line with a leading dot above.",
        ))
        .expect("called");
    assert_eq!(
        outcome,
        SendOutcome::Sent {
            provider_id: "idem-1@sunrise.example".into()
        }
    );
    let received = server.received();
    assert_eq!(received.len(), 1, "{received:?}");
    let mail = &received[0];
    assert_eq!(mail.helo, "caremsg.test");
    assert_eq!(mail.from, "care@sunrise.example");
    assert_eq!(mail.to, ["pat@example.org"]);
    assert!(!mail.tls);
    for (name, value) in [
        ("From", "\"Sunrise Clinic\" <care@sunrise.example>"),
        ("To", "pat@example.org"),
        ("Subject", "Your appointment"),
        ("Message-ID", "<idem-1@sunrise.example>"),
        ("Content-Type", "text/plain; charset=utf-8"),
    ] {
        assert_eq!(
            mail.header(name).as_deref(),
            Some(value),
            "{name}: {}",
            mail.text()
        );
    }
    assert!(mail.header("Date").is_some(), "{}", mail.text());
    // The dot line survived SMTP's dot-stuffing both ways.
    assert_eq!(
        mail.body().trim_end(),
        "See you on Tuesday at 10.\r\n.\r\nA line with a leading dot above."
    );
    let logs = harness.logs();
    assert!(
        logs.iter()
            .all(|(_, l)| !l.contains("pat@") && !l.contains("Tuesday")),
        "{logs:?}"
    );
}

#[test]
fn unicode_subjects_and_bodies_are_encoded() {
    let server = SmtpServer::start(Security::Plain, Script::default());
    let harness = plain(&server);
    let body = "Grüße aus der Praxis ✓\nZweite Zeile";
    harness
        .instance()
        .send(&outbound("pat@example.org", Some("Termin ✓"), body))
        .expect("called");
    let mail = &server.received()[0];
    let subject = mail.header("Subject").expect("subject");
    assert!(subject.contains("=?utf-8?"), "encoded word: {subject}");
    let encoding = mail
        .header("Content-Transfer-Encoding")
        .expect("transfer encoding");
    let decoded = match encoding.as_str() {
        "base64" => decode_base64(&mail.body()),
        "quoted-printable" => decode_quoted_printable(&mail.body()),
        "8bit" => mail.body(),
        other => panic!("unexpected transfer encoding {other}"),
    };
    assert_eq!(decoded.trim_end().replace("\r\n", "\n"), body);
}

#[test]
fn starttls_with_authentication() {
    let server = SmtpServer::start(
        Security::StartTls,
        Script {
            credentials: Some(("clinic", "s3cret-pass")),
            ..Script::default()
        },
    );
    let config = |password: &str| {
        format!(
            r#"{{"host": "localhost", "port": {}, "security": "starttls",
                "username": "clinic", "password": "{password}", "from": "care@sunrise.example",
                "root_certificates": "{}"}}"#,
            server.addr.port(),
            certs().join("ca.pem").display()
        )
    };
    let harness = start(config("s3cret-pass"));
    let outcome = harness
        .instance()
        .send(&outbound("pat@example.org", None, "Hello"))
        .expect("called");
    assert!(matches!(outcome, SendOutcome::Sent { .. }), "{outcome:?}");
    let mail = &server.received()[0];
    assert!(mail.tls, "the message went over TLS");
    assert_eq!(mail.user.as_deref(), Some("clinic"));
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("A message from your care team")
    );

    // A wrong password: 535, permanent, and health says why.
    let harness = start(config("wrong"));
    let outcome = harness
        .instance()
        .send(&outbound("pat@example.org", None, "Hello"))
        .expect("called");
    assert!(
        matches!(&outcome, SendOutcome::Permanent { code, .. } if code == "535"),
        "{outcome:?}"
    );
    assert!(matches!(
        harness.instance().health().expect("called"),
        Health::Down(_)
    ));
    assert_eq!(server.received().len(), 1);
}

#[test]
fn implicit_tls() {
    let server = SmtpServer::start(Security::Tls, Script::default());
    let harness = start(format!(
        r#"{{"host": "localhost", "port": {}, "security": "tls", "from": "care@sunrise.example",
            "root_certificates": "{}"}}"#,
        server.addr.port(),
        certs().join("ca.pem").display()
    ));
    let outcome = harness
        .instance()
        .send(&outbound("pat@example.org", Some("Hi"), "Hello"))
        .expect("called");
    assert!(matches!(outcome, SendOutcome::Sent { .. }), "{outcome:?}");
    assert!(server.received()[0].tls);
}

#[test]
fn tls_is_never_skipped() {
    // The server's certificate is not trusted (no root_certificates): no message.
    let server = SmtpServer::start(Security::Tls, Script::default());
    let harness = start(format!(
        r#"{{"host": "localhost", "port": {}, "security": "tls", "from": "care@sunrise.example"}}"#,
        server.addr.port()
    ));
    let outcome = harness
        .instance()
        .send(&outbound("pat@example.org", None, "Hello"))
        .expect("called");
    assert!(
        matches!(&outcome, SendOutcome::Retryable { code: Some(c), .. } if c == "tls"),
        "{outcome:?}"
    );

    // A server that offers no STARTTLS: refused, not sent in clear text.
    let server = SmtpServer::start(Security::Plain, Script::default());
    let harness = start(format!(
        r#"{{"host": "127.0.0.1", "port": {}, "security": "starttls", "from": "care@sunrise.example"}}"#,
        server.addr.port()
    ));
    let outcome = harness
        .instance()
        .send(&outbound("pat@example.org", None, "Hello"))
        .expect("called");
    assert!(
        matches!(&outcome, SendOutcome::Retryable { .. }),
        "{outcome:?}"
    );
    assert!(server.received().is_empty());
}

fn refused_with(script: Script) -> SendOutcome {
    let server = SmtpServer::start(Security::Plain, script);
    let harness = plain(&server);
    let outcome = harness
        .instance()
        .send(&outbound("pat@example.org", None, "Hello"))
        .expect("called");
    assert!(server.received().is_empty());
    outcome
}

#[test]
fn temporary_replies_are_retryable_and_permanent_ones_are_not() {
    let cases = [
        (
            Script {
                rcpt: Some((451, "4.7.1 <pat@example.org>: greylisted, try again later")),
                ..Script::default()
            },
            "retryable",
            "451",
        ),
        (
            Script {
                rcpt: Some((550, "5.1.1 <pat@example.org>: Recipient address rejected")),
                ..Script::default()
            },
            "permanent",
            "550",
        ),
        (
            Script {
                data_end: Some((452, "4.3.1 Insufficient system storage")),
                ..Script::default()
            },
            "retryable",
            "452",
        ),
        (
            Script {
                data_end: Some((554, "5.7.1 Message rejected as spam")),
                ..Script::default()
            },
            "permanent",
            "554",
        ),
    ];
    for (script, kind, code) in cases {
        let outcome = refused_with(script);
        let (got_kind, got_code, reason) = match &outcome {
            SendOutcome::Retryable {
                code: Some(c),
                reason,
                ..
            } => ("retryable", c.as_str(), reason.as_str()),
            SendOutcome::Permanent { code, reason } => {
                ("permanent", code.as_str(), reason.as_str())
            }
            other => panic!("{other:?}"),
        };
        assert_eq!((got_kind, got_code), (kind, code), "{outcome:?}");
        assert!(!reason.contains("pat@"), "PHI in {reason}");
        assert!(reason.contains(code), "{reason}");
    }
}

#[test]
fn no_server_is_retryable_and_a_bad_address_permanent() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let harness = start(format!(
        r#"{{"host": "127.0.0.1", "port": {port}, "security": "none", "from": "care@sunrise.example",
            "timeout_secs": 5}}"#
    ));
    let outcome = harness
        .instance()
        .send(&outbound("pat@example.org", None, "Hello"))
        .expect("called");
    assert!(
        matches!(&outcome, SendOutcome::Retryable { code: Some(c), .. } if c == "connection"),
        "{outcome:?}"
    );
    let outcome = harness
        .instance()
        .send(&outbound("+15550100", None, "Hello"))
        .expect("called");
    assert!(
        matches!(&outcome, SendOutcome::Permanent { code, .. } if code == "invalid-recipient"),
        "{outcome:?}"
    );
}

fn decode_base64(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let value = ALPHABET.iter().position(|a| *a == c).expect("base64") as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    String::from_utf8(out).expect("UTF-8")
}

fn decode_quoted_printable(text: &str) -> String {
    let text = text.replace("=\r\n", "");
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 2 < bytes.len() + 1 {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("hex");
            out.push(u8::from_str_radix(hex, 16).expect("hex"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("UTF-8")
}
