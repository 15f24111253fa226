//! Notification emails end to end: the daemon with the real `email-smtp` plugin as its
//! notifications' email gateway, sending to an SMTP server on loopback (a small sink
//! written here, speaking plain SMTP). A canary patient's name, phone, date of birth
//! and message text appear nowhere in the stored delivery or in the email received;
//! the practice, the kind and the link do. And a user without an email address is
//! told why, and notified in-app instead.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::time::Duration as StdDuration;

use caremsg_entities::{DeliveryChannel, DeliveryPurpose, delivery, notification};
use caremsg_tests::{ADMIN_TOKEN, PORTAL_TOKEN, STAFF_TOKEN, TestDaemon};
use chrono::Duration;
use reqwest::{Method, StatusCode};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// An SMTP server that accepts every message and hands its raw DATA to the test.
async fn smtp_sink() -> (u16, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 sink ESMTP\r\n").await.unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 sink\r\n",
                        "DATA" => {
                            write
                                .write_all(b"354 end with <CRLF>.<CRLF>\r\n")
                                .await
                                .unwrap();
                            let mut data = String::new();
                            while let Ok(Some(line)) = lines.next_line().await {
                                if line == "." {
                                    break;
                                }
                                data.push_str(&line);
                                data.push('\n');
                            }
                            let _ = tx.send(data);
                            b"250 queued\r\n"
                        }
                        "QUIT" => {
                            write.write_all(b"221 bye\r\n").await.unwrap();
                            break;
                        }
                        _ => b"250 ok\r\n",
                    };
                    write.write_all(reply).await.unwrap();
                }
            });
        }
    });
    (port, rx)
}

/// A daemon whose notification emails go through `email-smtp` to `port`.
async fn daemon_with_email(port: u16) -> TestDaemon {
    let library = caremsg_testplugins::library_path("caremsg-email-smtp").unwrap();
    TestDaemon::start_with(move |text| {
        let text = text.replace(
            "link_base_url = \"http://127.0.0.1:3000/patients/\"",
            "link_base_url = \"https://care.example/patients/\"\nemail_gateway = \"mail\"",
        );
        format!(
            "{text}\n[[gateways]]\nname = \"mail\"\nkind = \"email\"\nlibrary = {:?}\n\
             config = {{ host = \"127.0.0.1\", port = {port}, security = \"none\", \
             from = \"Care Team <care@clinic.example>\", timeout_secs = 10 }}\n",
            library.display().to_string()
        )
    })
    .await
    .unwrap()
}

async fn staff(
    d: &TestDaemon,
    method: Method,
    user: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    d.call_as(method, path, Some(STAFF_TOKEN), Some(user), body.as_ref())
        .await
}

async fn next_email(inbox: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(StdDuration::from_secs(30), inbox.recv())
        .await
        .expect("an email within 30 s")
        .expect("the sink runs")
}

/// The canary's values, in the forms they could take in an email.
const CANARY: &[&str] = &[
    "Zebulon",
    "Quarrington",
    "zebulon",
    "quarrington",
    "1931-02-03",
    "02/03/1931",
    "2/3/1931",
    "+12015550147",
    "2015550147",
    "555-0147",
    "5550147",
    "CANARY-77",
    "chest",
];

fn assert_no_canary(what: &str, text: &str) {
    for value in CANARY {
        assert!(
            !text.contains(value),
            "{what} contains the canary value {value:?}:\n{text}"
        );
    }
}

#[tokio::test]
async fn a_canary_patients_notification_emails_carry_no_phi() {
    let (port, mut inbox) = smtp_sink().await;
    let d = daemon_with_email(port).await;
    d.practice("p1").await;
    d.user("p1", "nurse", &[]).await;
    let (status, body) = d
        .admin_put(
            "/v1/admin/patients/canary-1",
            json!({"practice_id": "p1", "first_name": "Zebulon", "last_name": "Quarrington",
                   "date_of_birth": "1931-02-03", "mobile_phone": "(201) 555-0147",
                   "portal_enrolled": true, "programs": [], "care_team": ["nurse"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = staff(
        &d,
        Method::PUT,
        "nurse",
        "/v1/staff/settings/notifications",
        Some(json!({"unread_reminder": true,
                    "channels": {"new_patient_message": ["email"], "unread_reminder": ["email", "in_app"]}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["email_unavailable"], Value::Null);

    let (status, body) = d
        .call(
            Method::POST,
            "/v1/portal/patients/canary-1/messages",
            Some(PORTAL_TOKEN),
            Some(&json!({"body": "CANARY-77 my chest hurts at night"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // The stored delivery.
    let rows = delivery::Entity::find()
        .filter(delivery::Column::Channel.eq(DeliveryChannel::Email))
        .all(&d.daemon().state().db)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row.purpose, DeliveryPurpose::Notification);
    assert_eq!(row.gateway.as_deref(), Some("mail"));
    assert_eq!(row.recipient.as_deref(), Some("nurse@clinic.example"));
    assert_eq!(row.message_id, None);
    let stored_email = format!(
        "{}\n{}",
        row.subject.clone().unwrap(),
        row.body.clone().unwrap()
    );
    assert_no_canary("the stored email", &stored_email);
    assert_eq!(
        row.subject.as_deref(),
        Some("Clinic p1: New patient message")
    );
    assert!(
        stored_email.contains("https://care.example/patients/canary-1"),
        "{stored_email}"
    );

    // The email received: none of the canary's values, and (so the check means
    // something) the practice, the kind and the link in readable text.
    let email = next_email(&mut inbox).await;
    assert_no_canary("the email received", &email);
    for expected in [
        "Clinic p1",
        "New patient message",
        "https://care.example/patients/canary-1",
        "nurse@clinic.example",
    ] {
        assert!(
            email.contains(expected),
            "{expected:?} missing from:\n{email}"
        );
    }
    let counted = |channel: &str| {
        format!(r#"caremsg_notifications_total{{kind="new_patient_message",channel="{channel}"}}"#)
    };
    assert_eq!(d.metric(&counted("email")).await, 1.0);
    assert_eq!(d.metric(&counted("in_app")).await, 0.0);
    // Email only: the in-app list keeps it, already read.
    let (_, list) = staff(&d, Method::GET, "nurse", "/v1/staff/notifications", None).await;
    assert_eq!(list["unread"], 0);
    assert_eq!(list["notifications"][0]["kind"], "new_patient_message");

    // The reminder, a day later, by email and in-app.
    d.clock.advance(Duration::hours(24));
    d.daemon().tick_timers().await.unwrap();
    let email = next_email(&mut inbox).await;
    assert_no_canary("the reminder email", &email);
    assert!(email.contains("Unread message reminder"), "{email}");
    let (_, list) = staff(&d, Method::GET, "nurse", "/v1/staff/notifications", None).await;
    assert_eq!(list["unread"], 1);
    assert_eq!(list["notifications"][0]["kind"], "unread_reminder");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_user_without_an_email_address_is_told_why_and_notified_in_app() {
    let (port, _inbox) = smtp_sink().await;
    let d = daemon_with_email(port).await;
    d.practice("p1").await;
    let (status, body) = d
        .call(
            Method::PUT,
            "/v1/admin/users/noaddr",
            Some(ADMIN_TOKEN),
            Some(&json!({"practice_id": "p1", "name": "No Address", "restricted_programs": []})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    d.patient("p1", "pat1", &[], &["noaddr"]).await;
    let (status, body) = staff(
        &d,
        Method::PUT,
        "noaddr",
        "/v1/staff/settings/notifications",
        Some(json!({"channels": {"new_patient_message": ["email"]}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["email_unavailable"], "no email address");
    assert_eq!(body["channels"]["new_patient_message"], json!(["email"]));
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/portal/patients/pat1/messages",
            Some(PORTAL_TOKEN),
            Some(&json!({"body": "hello"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let rows = notification::Entity::find()
        .all(&d.daemon().state().db)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].read_at, None, "in-app instead: unread");
    let emails = delivery::Entity::find()
        .filter(delivery::Column::Channel.eq(DeliveryChannel::Email))
        .all(&d.daemon().state().db)
        .await
        .unwrap();
    assert_eq!(emails, []);
    d.stop().await.unwrap();
}
