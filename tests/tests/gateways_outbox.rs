//! The outbox end to end, with real plugin libraries: a staff message reaches the
//! loopback outbox; consent is checked at claim time; a panicking plugin fails its
//! delivery and the daemon goes on; a storm of retryable errors comes back spread; a
//! provider's push-back pauses the instance; rate limits hold and change on reload;
//! a claim is committed before the plugin is called, and a delivery a crash left
//! `sending` is reconciled, not sent again, until an operator resolves it through the
//! admin API.
//!
//! Dispatchers are driven with `outbox::run_once`, which returns when every due row
//! is recorded; the injected clock never moves by itself, so retries stay put.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use caremsg_entities::{
    DeliveryChannel, DeliveryPurpose, DeliveryStatus, SmsStatus, delivery, patient, sms_consent,
};
use caremsg_tests::{ADMIN_TOKEN, STAFF_TOKEN, TestDaemon, practice_body};
use caremsgd::clock::Clock;
use caremsgd::gateways::outbox::{self, OPT_OUT_CONFIRMATION_SUBJECT};
use caremsgd::reload::ReloadOutcome;
use chrono::{DateTime, TimeDelta, Utc};
use reqwest::{Method, StatusCode};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

/// The patient's mobile number as `patient_body` gives it, in E.164.
const MOBILE: &str = "+12015550123";

/// The number of practice `id`, as `practice_body` gives it.
fn number_of(practice: &str) -> String {
    practice_body(practice)["sms_numbers"][0]["number"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn db(d: &TestDaemon) -> &DatabaseConnection {
    &d.daemon().state().db
}

/// A practice `p1` (its number on `gateway`), user `u1`, patient `pat1` whose SMS
/// status is set to `enabled` directly (SMS authentication is another issue's).
async fn setup(d: &TestDaemon, gateway: &str) {
    let mut practice = practice_body("p1");
    practice["sms_numbers"][0]["gateway"] = json!(gateway);
    let (status, body) = d.admin_put("/v1/admin/practices/p1", practice).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    d.user("p1", "u1", &[]).await;
    d.patient("p1", "pat1", &[], &["u1"]).await;
    patient::Entity::update_many()
        .col_expr(patient::Column::SmsStatus, Expr::value(SmsStatus::Enabled))
        .filter(patient::Column::Id.eq("pat1"))
        .exec(db(d))
        .await
        .unwrap();
}

/// `count` due SMS deliveries to `to` through `gateway`, inserted directly.
async fn queue(
    d: &TestDaemon,
    gateway: &str,
    to: &str,
    purpose: DeliveryPurpose,
    subject: Option<&str>,
    count: usize,
) -> Vec<String> {
    let now = d.clock.now();
    let mut ids = Vec::new();
    for i in 0..count {
        let id = uuid::Uuid::now_v7().to_string();
        delivery::Entity::insert(delivery::ActiveModel {
            id: Set(id.clone()),
            message_id: Set(None),
            notification_id: Set(None),
            patient_id: Set(Some("pat1".into())),
            practice_id: Set("p1".into()),
            channel: Set(DeliveryChannel::Sms),
            purpose: Set(purpose),
            gateway: Set(Some(gateway.into())),
            recipient: Set(Some(to.into())),
            from_number: Set(Some(number_of("p1"))),
            subject: Set(subject.map(str::to_owned)),
            body: Set(Some(format!("Test text {i}."))),
            status: Set(DeliveryStatus::Queued),
            attempts: Set(0),
            next_attempt_at: Set(now),
            claimed_at: Set(None),
            provider_message_id: Set(None),
            error_code: Set(None),
            error_reason: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .exec_without_returning(db(d))
        .await
        .unwrap();
        ids.push(id);
    }
    ids
}

async fn get(d: &TestDaemon, id: &str) -> delivery::Model {
    delivery::Entity::find_by_id(id.to_owned())
        .one(db(d))
        .await
        .unwrap()
        .unwrap()
}

async fn count(d: &TestDaemon, status: DeliveryStatus) -> u64 {
    delivery::Entity::find()
        .filter(delivery::Column::Status.eq(status))
        .count(db(d))
        .await
        .unwrap()
}

/// The lines of the loopback outbox file.
fn outbox_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("loopback-outbox.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The `[[gateways]]` table of a test plugin, appended to the test config.
fn gateway_table(name: &str, package: &str, extra: &str) -> String {
    let library = caremsg_testplugins::library_path(package).unwrap();
    format!(
        "\n[[gateways]]\nname = {name:?}\nkind = \"sms\"\nlibrary = {:?}\n{extra}\n",
        library.display().to_string()
    )
}

/// While set: where the fake announces a request, and what releases it.
type Hold = Option<(mpsc::UnboundedSender<()>, Arc<Notify>)>;

/// A provider for the `http-status` test plugin: answers every request with the
/// scripted status (and `Retry-After`), or holds it until released.
struct Fake {
    addr: SocketAddr,
    /// (status, retry-after seconds).
    script: Arc<Mutex<(u16, Option<u64>)>>,
    /// Requests answered or held.
    hits: Arc<AtomicUsize>,
    /// While set, a request is announced on the sender and held until notified.
    hold: Arc<Mutex<Hold>>,
}

impl Fake {
    async fn start(status: u16, retry_after: Option<u64>) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Fake {
            addr: listener.local_addr().unwrap(),
            script: Arc::new(Mutex::new((status, retry_after))),
            hits: Arc::default(),
            hold: Arc::default(),
        };
        let (script, hits, hold) = (fake.script.clone(), fake.hits.clone(), fake.hold.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (script, hits, hold) = (script.clone(), hits.clone(), hold.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    let (head_end, length) = loop {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (end + 4, length);
                        }
                    };
                    while request.len() < head_end + length {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                    }
                    let n = hits.fetch_add(1, Ordering::SeqCst);
                    let held = hold.lock().unwrap().clone();
                    if let Some((arrived, release)) = held {
                        let released = release.notified();
                        let _ = arrived.send(());
                        released.await;
                    }
                    let (status, retry_after) = *script.lock().unwrap();
                    let body = format!("PROV-{n}");
                    let retry = retry_after
                        .map(|s| format!("retry-after: {s}\r\n"))
                        .unwrap_or_default();
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n{retry}connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        fake
    }

    fn answer(&self, status: u16, retry_after: Option<u64>) {
        *self.script.lock().unwrap() = (status, retry_after);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// The `[[gateways]]` table of an http-status instance pointed at this fake.
    fn table(&self, name: &str, concurrency: usize) -> String {
        gateway_table(
            name,
            caremsg_testplugins::HTTP_STATUS,
            &format!(
                "config = {{ url = \"http://{}/messages\" }}\nallowed_hosts = [\"{}\"]\nconcurrency = {concurrency}",
                self.addr, self.addr
            ),
        )
    }
}

#[tokio::test]
async fn a_staff_message_to_an_sms_enabled_patient_is_appended_to_the_loopback_outbox() {
    let d = TestDaemon::start().await.unwrap();
    setup(&d, "loopback").await;
    let (status, body) = d
        .call_as(
            Method::POST,
            "/v1/staff/patients/pat1/messages",
            Some(STAFF_TOKEN),
            Some("u1"),
            Some(&json!({"body": "Your lab results are in.", "client_txn_id": "t1"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let state = d.daemon().state();
    outbox::run_once(state, "loopback").await.unwrap();
    outbox::run_portal_once(state).await.unwrap();

    let lines = outbox_lines(d.dir.path());
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["to"], MOBILE);
    assert_eq!(line["from"], number_of("p1"));
    assert_eq!(line["body"], "Your lab results are in.");
    assert_eq!(line["segments"], 1);
    let rows = delivery::Entity::find().all(db(&d)).await.unwrap();
    let sms = rows
        .iter()
        .find(|r| r.channel == DeliveryChannel::Sms)
        .unwrap();
    assert_eq!(sms.status, DeliveryStatus::Sent);
    assert_eq!(sms.attempts, 1);
    assert_eq!(sms.provider_message_id.as_deref(), line["id"].as_str());
    assert_eq!(
        line["delivery_id"].as_str(),
        Some(sms.id.as_str()),
        "the outbox line names the delivery"
    );
    // The portal delivery names no portal gateway: the portal API serves it.
    let portal = rows
        .iter()
        .find(|r| r.channel == DeliveryChannel::Portal)
        .unwrap();
    assert_eq!(portal.status, DeliveryStatus::Sent);

    // A second pass sends nothing again.
    let report = outbox::run_once(state, "loopback").await.unwrap();
    assert_eq!(report.claimed, 0);
    assert_eq!(outbox_lines(d.dir.path()).len(), 1);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_delivery_to_an_opted_out_number_is_refused_at_claim_time() {
    let d = TestDaemon::start().await.unwrap();
    setup(&d, "loopback").await;
    // The number texted STOP; the patient's status has not caught up (the staff
    // message is still created): the claim must catch it.
    sms_consent::Entity::insert(sms_consent::ActiveModel {
        practice_id: Set("p1".into()),
        phone: Set(MOBILE.into()),
        opted_out: Set(true),
        reason: Set(Some("patient_stop".into())),
        changed_at: Set(d.clock.now()),
    })
    .exec_without_returning(db(&d))
    .await
    .unwrap();
    let (status, body) = d
        .call_as(
            Method::POST,
            "/v1/staff/patients/pat1/messages",
            Some(STAFF_TOKEN),
            Some("u1"),
            Some(&json!({"body": "Are you there?"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let other = queue(&d, "loopback", MOBILE, DeliveryPurpose::SmsAuth, None, 1).await;
    let confirmation = queue(
        &d,
        "loopback",
        MOBILE,
        DeliveryPurpose::SmsAuth,
        Some(OPT_OUT_CONFIRMATION_SUBJECT),
        1,
    )
    .await;
    outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();

    let staff_sms = delivery::Entity::find()
        .filter(delivery::Column::Channel.eq(DeliveryChannel::Sms))
        .filter(delivery::Column::MessageId.is_not_null())
        .one(db(&d))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(staff_sms.status, DeliveryStatus::Refused);
    assert_eq!(staff_sms.error_code.as_deref(), Some("number_opted_out"));
    assert_eq!(staff_sms.attempts, 0, "never handed to the plugin");
    assert_eq!(get(&d, &other[0]).await.status, DeliveryStatus::Refused);
    // The one exemption: the opt-out confirmation.
    assert_eq!(get(&d, &confirmation[0]).await.status, DeliveryStatus::Sent);
    let lines = outbox_lines(d.dir.path());
    assert_eq!(lines.len(), 1, "only the confirmation went out: {lines:?}");
    assert_eq!(lines[0]["body"], "Test text 0.");

    // A patient opted out (by staff) is refused too, whatever the number's consent.
    patient::Entity::update_many()
        .col_expr(patient::Column::SmsStatus, Expr::value(SmsStatus::OptedOut))
        .filter(patient::Column::Id.eq("pat1"))
        .exec(db(&d))
        .await
        .unwrap();
    let to_other_number = queue(
        &d,
        "loopback",
        "+12015550199",
        DeliveryPurpose::SmsAuth,
        None,
        1,
    )
    .await;
    outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();
    let row = get(&d, &to_other_number[0]).await;
    assert_eq!(row.status, DeliveryStatus::Refused);
    assert_eq!(row.error_code.as_deref(), Some("patient_opted_out"));
    assert_eq!(outbox_lines(d.dir.path()).len(), 1);
    d.stop().await.unwrap();
}

/// A staff text queued for the number the patient had (a provider outage held it)
/// is not sent once the patient's number is another one, even if SMS is enabled
/// again on the new number: the old number may be someone else's now.
#[tokio::test]
async fn a_text_queued_for_the_patients_old_number_is_refused() {
    let d = TestDaemon::start().await.unwrap();
    setup(&d, "loopback").await;
    let old_number = queue(
        &d,
        "loopback",
        "+12015550199",
        DeliveryPurpose::Message,
        None,
        1,
    )
    .await;
    outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();
    let row = get(&d, &old_number[0]).await;
    assert_eq!(row.status, DeliveryStatus::Refused);
    assert_eq!(row.error_code.as_deref(), Some("number_changed"));
    assert_eq!(row.attempts, 0, "never handed to the plugin");
    assert!(outbox_lines(d.dir.path()).is_empty());
    // One for the patient's number goes out.
    let current = queue(&d, "loopback", MOBILE, DeliveryPurpose::Message, None, 1).await;
    outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();
    assert_eq!(get(&d, &current[0]).await.status, DeliveryStatus::Sent);
    assert_eq!(outbox_lines(d.dir.path()).len(), 1);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_plugin_that_panics_fails_its_delivery_and_the_daemon_goes_on() {
    let broken = gateway_table("broken", caremsg_testplugins::BROKEN_PANICS, "config = {}");
    let d = TestDaemon::start_with(|text| text + &broken).await.unwrap();
    setup(&d, "broken").await;
    let ids = queue(&d, "broken", MOBILE, DeliveryPurpose::SmsAuth, None, 3).await;
    let report = outbox::run_once(d.daemon().state(), "broken")
        .await
        .unwrap();
    // The dispatcher's own pass may have claimed one of them first: every claim
    // fails, and all three end failed.
    assert_eq!(report.claimed, report.failed, "{report:?}");
    for id in &ids {
        let mut row = get(&d, id).await;
        for _ in 0..500 {
            if row.status != DeliveryStatus::Queued && row.status != DeliveryStatus::Sending {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            row = get(&d, id).await;
        }
        assert_eq!(row.status, DeliveryStatus::Failed);
        assert_eq!(row.error_code.as_deref(), Some("plugin_panicked"));
        // The panic message (fake PHI) is not stored.
        assert!(!row.error_reason.unwrap_or_default().contains("1555"));
    }
    // Its webhook panics too: contained, answered 500.
    let response = d
        .http
        .post(format!("{}/v1/hooks/broken", d.base))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    // The daemon serves on, and the other gateway still sends.
    let (status, _) = d.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let ok = queue(&d, "loopback", MOBILE, DeliveryPurpose::SmsAuth, None, 1).await;
    outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();
    assert_eq!(get(&d, &ok[0]).await.status, DeliveryStatus::Sent);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_storm_of_retryable_errors_comes_back_spread_out() {
    let fake = Fake::start(503, None).await;
    let table = fake.table("fake", 8);
    let d = TestDaemon::start_with(|text| text + &table).await.unwrap();
    setup(&d, "fake").await;
    let ids = queue(&d, "fake", MOBILE, DeliveryPurpose::SmsAuth, None, 100).await;
    let now = d.clock.now();
    outbox::run_once(d.daemon().state(), "fake").await.unwrap();
    assert_eq!(fake.hits(), 100);
    let mut instants: Vec<DateTime<Utc>> = Vec::new();
    for id in &ids {
        let row = get(&d, id).await;
        assert_eq!(row.status, DeliveryStatus::Queued, "{row:?}");
        assert_eq!(row.attempts, 1);
        assert!(row.error_reason.is_some());
        assert!(row.next_attempt_at > now, "{row:?}");
        assert!(row.next_attempt_at <= now + TimeDelta::seconds(2) + TimeDelta::milliseconds(300));
        instants.push(row.next_attempt_at);
    }
    instants.sort();
    for pair in instants.windows(2) {
        assert!(
            pair[1] - pair[0] > TimeDelta::milliseconds(1),
            "two retries within 1 ms: {} and {}",
            pair[0],
            pair[1]
        );
    }
    // Nothing is due before the clock moves.
    let report = outbox::run_once(d.daemon().state(), "fake").await.unwrap();
    assert_eq!(report.claimed, 0);
    assert_eq!(fake.hits(), 100);
    // Due again, and the provider is back: all go out, each once more.
    fake.answer(201, None);
    d.clock.advance(TimeDelta::seconds(3));
    outbox::drain(d.daemon().state(), "fake").await.unwrap();
    assert_eq!(count(&d, DeliveryStatus::Sent).await, 100);
    assert_eq!(fake.hits(), 200);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn provider_push_back_pauses_the_instance() {
    let fake = Fake::start(429, Some(30)).await;
    let table = fake.table("fake", 2);
    let d = TestDaemon::start_with(|text| text + &table).await.unwrap();
    setup(&d, "fake").await;
    let ids = queue(&d, "fake", MOBILE, DeliveryPurpose::SmsAuth, None, 50).await;
    let now = d.clock.now();
    let report = outbox::run_once(d.daemon().state(), "fake").await.unwrap();
    // At most the calls already under way when the first 429 came back.
    assert!(
        fake.hits() <= 2,
        "{} requests reached the provider",
        fake.hits()
    );
    assert!(report.paused_until.is_some(), "{report:?}");
    let mut instants = Vec::new();
    for id in &ids {
        let row = get(&d, id).await;
        assert_eq!(row.status, DeliveryStatus::Queued);
        assert!(
            row.next_attempt_at >= now + TimeDelta::seconds(30),
            "{row:?}"
        );
        instants.push(row.next_attempt_at);
    }
    let tried = ids.len() - {
        let mut untried = 0;
        for id in &ids {
            untried += usize::from(get(&d, id).await.attempts == 0);
        }
        untried
    };
    assert_eq!(tried, fake.hits(), "rows not handed over count no attempt");
    instants.sort();
    assert!(
        instants
            .windows(2)
            .all(|p| p[1] - p[0] > TimeDelta::milliseconds(1))
    );
    // Still paused: nothing is called.
    outbox::run_once(d.daemon().state(), "fake").await.unwrap();
    assert!(fake.hits() <= 2);
    // After the pause (and the spread), the provider takes everything.
    fake.answer(201, None);
    d.clock.advance(TimeDelta::seconds(60));
    outbox::drain(d.daemon().state(), "fake").await.unwrap();
    assert_eq!(count(&d, DeliveryStatus::Sent).await, 50);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn rate_limits_hold_and_a_reload_changes_them() {
    // Almost no refill: the burst is what may go out.
    let limit = "rate_limit = { per_second = 0.001, burst = 3 }\n";
    let d = TestDaemon::start_with(|text| text + limit).await.unwrap();
    setup(&d, "loopback").await;
    queue(&d, "loopback", MOBILE, DeliveryPurpose::SmsAuth, None, 10).await;
    let report = outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();
    assert!(report.limited_for.is_some(), "{report:?}");
    assert_eq!(count(&d, DeliveryStatus::Sent).await, 3);
    assert_eq!(count(&d, DeliveryStatus::Queued).await, 7);
    let waits = r#"caremsg_rate_limit_waits_total{gateway="loopback",limit="instance"}"#;
    assert_eq!(d.metric(waits).await, 1.0);
    outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();
    assert_eq!(count(&d, DeliveryStatus::Sent).await, 3);
    assert_eq!(outbox_lines(d.dir.path()).len(), 3);

    // A reload raises the burst: the new limiter lets the rest through.
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(&d.config_path, text.replace("burst = 3", "burst = 8")).unwrap();
    let outcome = d.daemon().reload();
    assert!(
        matches!(&outcome, ReloadOutcome::Applied(f) if f.iter().any(|f| f.contains("rate_limit"))),
        "{outcome:?}"
    );
    outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();
    assert_eq!(count(&d, DeliveryStatus::Sent).await, 10);
    assert_eq!(outbox_lines(d.dir.path()).len(), 10);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_per_recipient_limit_defers_only_that_recipient() {
    let limit = "per_recipient = { per_second = 0.001, burst = 1 }\n";
    let d = TestDaemon::start_with(|text| text + limit).await.unwrap();
    setup(&d, "loopback").await;
    let same = queue(&d, "loopback", MOBILE, DeliveryPurpose::SmsAuth, None, 3).await;
    let other = queue(
        &d,
        "loopback",
        "+12015550199",
        DeliveryPurpose::SmsAuth,
        None,
        1,
    )
    .await;
    outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();
    assert_eq!(get(&d, &other[0]).await.status, DeliveryStatus::Sent);
    let mut sent = 0;
    for id in &same {
        let row = get(&d, id).await;
        match row.status {
            DeliveryStatus::Sent => sent += 1,
            DeliveryStatus::Queued => {
                assert!(row.next_attempt_at > d.clock.now(), "deferred: {row:?}");
                assert_eq!(row.attempts, 0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sent, 1);
    let waits = r#"caremsg_rate_limit_waits_total{gateway="loopback",limit="recipient"}"#;
    assert_eq!(d.metric(waits).await, 2.0);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn unsubscribed_fails_the_delivery_and_opts_the_number_out() {
    let fake = Fake::start(410, None).await;
    let table = fake.table("fake", 1);
    let d = TestDaemon::start_with(|text| text + &table).await.unwrap();
    setup(&d, "fake").await;
    let ids = queue(&d, "fake", MOBILE, DeliveryPurpose::SmsAuth, None, 1).await;
    outbox::run_once(d.daemon().state(), "fake").await.unwrap();
    let row = get(&d, &ids[0]).await;
    assert_eq!(row.status, DeliveryStatus::Failed);
    assert_eq!(row.error_code.as_deref(), Some("unsubscribed"));
    let consent = sms_consent::Entity::find_by_id(("p1".to_owned(), MOBILE.to_owned()))
        .one(db(&d))
        .await
        .unwrap()
        .unwrap();
    assert!(consent.opted_out);
    assert_eq!(consent.reason.as_deref(), Some("carrier_unsubscribed"));
    let patient = patient::Entity::find_by_id("pat1".to_owned())
        .one(db(&d))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(patient.sms_status, SmsStatus::OptedOut);
    assert_eq!(
        patient.sms_status_reason.as_deref(),
        Some("carrier_unsubscribed")
    );
    // Nothing more goes to the number.
    fake.answer(201, None);
    let next = queue(&d, "fake", MOBILE, DeliveryPurpose::SmsAuth, None, 1).await;
    outbox::run_once(d.daemon().state(), "fake").await.unwrap();
    assert_eq!(get(&d, &next[0]).await.status, DeliveryStatus::Refused);
    assert_eq!(fake.hits(), 1);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_claim_is_committed_before_the_call_and_a_crash_leaves_it_to_reconcile() {
    let fake = Fake::start(201, None).await;
    let table = fake.table("fake", 1);
    let mut d = TestDaemon::start_with(|text| text + &table).await.unwrap();
    setup(&d, "fake").await;

    // While the provider holds the request, the row is already `sending`, durably.
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    *fake.hold.lock().unwrap() = Some((arrived_tx, release.clone()));
    let ids = queue(&d, "fake", MOBILE, DeliveryPurpose::SmsAuth, None, 1).await;
    let state = d.daemon().state().clone();
    let pass = tokio::spawn(async move { outbox::run_once(&state, "fake").await });
    arrived.recv().await.unwrap();
    let row = get(&d, &ids[0]).await;
    assert_eq!(row.status, DeliveryStatus::Sending);
    assert!(row.claimed_at.is_some());
    assert_eq!(row.attempts, 1);
    *fake.hold.lock().unwrap() = None;
    release.notify_one();
    pass.await.unwrap().unwrap();
    assert_eq!(get(&d, &ids[0]).await.status, DeliveryStatus::Sent);

    // A row claimed when the process died (`sending` in the database) is not sent
    // again after the restart: it waits for reconciliation, and says why.
    let stranded = queue(&d, "fake", MOBILE, DeliveryPurpose::SmsAuth, None, 1).await;
    delivery::Entity::update_many()
        .col_expr(
            delivery::Column::Status,
            Expr::value(DeliveryStatus::Sending),
        )
        .col_expr(delivery::Column::ClaimedAt, Expr::value(d.clock.now()))
        .filter(delivery::Column::Id.eq(stranded[0].clone()))
        .exec(db(&d))
        .await
        .unwrap();
    d.restart().await.unwrap();
    let hits = fake.hits();
    outbox::run_once(d.daemon().state(), "fake").await.unwrap();
    let row = get(&d, &stranded[0]).await;
    assert_eq!(row.status, DeliveryStatus::Reconcile);
    assert_eq!(row.error_code.as_deref(), Some("outcome_unknown"));
    assert!(row.error_reason.unwrap().contains("not sent again"));
    assert_eq!(fake.hits(), hits, "nothing was sent again");
    d.stop().await.unwrap();
}

/// Rows left `sending` by a "crash", reconciled by the restart.
async fn stranded(d: &mut TestDaemon, count: usize) -> Vec<String> {
    let ids = queue(d, "loopback", MOBILE, DeliveryPurpose::SmsAuth, None, count).await;
    delivery::Entity::update_many()
        .col_expr(
            delivery::Column::Status,
            Expr::value(DeliveryStatus::Sending),
        )
        .col_expr(delivery::Column::ClaimedAt, Expr::value(d.clock.now()))
        .filter(delivery::Column::Id.is_in(ids.clone()))
        .exec(db(d))
        .await
        .unwrap();
    d.restart().await.unwrap();
    ids
}

async fn resolve(d: &TestDaemon, id: &str, action: &str) -> (StatusCode, Value) {
    d.call(
        Method::POST,
        &format!("/v1/admin/deliveries/{id}/resolve"),
        Some(ADMIN_TOKEN),
        Some(&json!({ "action": action })),
    )
    .await
}

#[tokio::test]
async fn an_operator_lists_and_resolves_deliveries_left_to_reconcile() {
    let mut d = TestDaemon::start().await.unwrap();
    setup(&d, "loopback").await;
    let ids = stranded(&mut d, 3).await;
    assert_eq!(d.metric("caremsg_deliveries_reconcile").await, 3.0);

    // Listed, paged, oldest first; without the recipient or the text.
    let list = |query: &'static str| d.call(Method::GET, query, Some(ADMIN_TOKEN), None);
    let (status, page) = list("/v1/admin/deliveries?status=reconcile&limit=2").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let listed = |page: &Value| -> Vec<String> {
        page["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut seen = listed(&page);
    assert_eq!(seen.len(), 2);
    assert_eq!(page["deliveries"][0]["status"], "reconcile");
    assert_eq!(page["deliveries"][0]["error_code"], "outcome_unknown");
    assert_eq!(page["deliveries"][0]["gateway"], "loopback");
    assert!(!page.to_string().contains(MOBILE), "no recipient: {page}");
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, rest) = d
        .call(
            Method::GET,
            &format!("/v1/admin/deliveries?status=reconcile&limit=2&cursor={cursor}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    seen.extend(listed(&rest));
    assert_eq!(rest["next_cursor"], Value::Null);
    seen.sort();
    let mut all = ids.clone();
    all.sort();
    assert_eq!(seen, all);
    // `reconcile` is the default; other statuses can be listed; bad input is a 422.
    let (_, default) = list("/v1/admin/deliveries").await;
    assert_eq!(listed(&default).len(), 3);
    for (query, field) in [
        ("/v1/admin/deliveries?status=lost", "status"),
        ("/v1/admin/deliveries?limit=0", "limit"),
        ("/v1/admin/deliveries?cursor=zz", "cursor"),
    ] {
        let (status, body) = list(query).await;
        assert_eq!(
            (status, body["error"]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{query}: {body}"
        );
    }
    let (status, _) = d
        .call(Method::GET, "/v1/admin/deliveries", Some(STAFF_TOKEN), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Resolutions: a bad action, an unknown id.
    let (status, body) = resolve(&d, &ids[0], "retry").await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("action")),
        "{body}"
    );
    let (status, _) = resolve(&d, "no-such-delivery", "resend").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // resend: queued again, and sent by the next pass, the outbox line naming it.
    let (status, body) = resolve(&d, &ids[0], "resend").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("queued")),
        "{body}"
    );
    outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();
    assert_eq!(get(&d, &ids[0]).await.status, DeliveryStatus::Sent);
    let lines = outbox_lines(d.dir.path());
    let sent: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["delivery_id"].as_str())
        .collect();
    assert_eq!(
        sent,
        [ids[0].as_str()],
        "only the resent one left the building"
    );
    // mark_sent and mark_failed close them; nothing is sent.
    let (status, body) = resolve(&d, &ids[1], "mark_sent").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("sent")),
        "{body}"
    );
    let (status, body) = resolve(&d, &ids[2], "mark_failed").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("failed")),
        "{body}"
    );
    assert_eq!(body["error_code"], "operator_marked_failed");
    outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();
    assert_eq!(outbox_lines(d.dir.path()).len(), 1);
    // Only a delivery in reconcile can be resolved.
    let (status, body) = resolve(&d, &ids[1], "resend").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_in_reconcile"))
    );
    assert_eq!(d.metric("caremsg_deliveries_reconcile").await, 0.0);
    // Each resolution is audited, with the delivery and the action.
    let audits = caremsg_entities::audit_log::Entity::find()
        .filter(caremsg_entities::audit_log::Column::Action.eq("admin.delivery.resolve"))
        .all(db(&d))
        .await
        .unwrap();
    let mut details: Vec<String> = audits.iter().filter_map(|a| a.detail.clone()).collect();
    details.sort();
    let mut expected = vec![
        format!("delivery_id={} action=resend", ids[0]),
        format!("delivery_id={} action=mark_sent", ids[1]),
        format!("delivery_id={} action=mark_failed", ids[2]),
    ];
    expected.sort();
    assert_eq!(details, expected);
    assert!(
        audits
            .iter()
            .all(|a| a.patient_id.as_deref() == Some("pat1"))
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_reload_restarts_an_instance_whose_config_changed() {
    let d = TestDaemon::start().await.unwrap();
    setup(&d, "loopback").await;
    let first = queue(&d, "loopback", MOBILE, DeliveryPurpose::SmsAuth, None, 1).await;
    outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();
    assert_eq!(get(&d, &first[0]).await.status, DeliveryStatus::Sent);

    let second_outbox = d.dir.path().join("second-outbox.jsonl");
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    let text: String = text
        .lines()
        .map(|line| {
            if line.starts_with("config = { outbox = ") {
                format!(
                    "config = {{ outbox = {:?} }}",
                    second_outbox.display().to_string()
                )
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&d.config_path, text).unwrap();
    let outcome = d.daemon().reload();
    assert!(
        matches!(&outcome, ReloadOutcome::Applied(f) if f.iter().any(|f| f.contains("config"))),
        "{outcome:?}"
    );
    d.daemon().state().gateways.settle().await;
    let second = queue(&d, "loopback", MOBILE, DeliveryPurpose::SmsAuth, None, 1).await;
    outbox::run_once(d.daemon().state(), "loopback")
        .await
        .unwrap();
    assert_eq!(get(&d, &second[0]).await.status, DeliveryStatus::Sent);
    assert_eq!(
        outbox_lines(d.dir.path()).len(),
        1,
        "the old file got nothing more"
    );
    let moved = std::fs::read_to_string(&second_outbox).unwrap();
    assert_eq!(moved.lines().count(), 1);
    d.stop().await.unwrap();
}

/// Issue #13 rule 2: each send's outcome is recorded as that send completes, not
/// after the whole pass — so a crash mid-pass leaves `sending` (to reconcile) only
/// the sends still in flight — and a delivery receipt that arrives before its
/// send's outcome is parked and applied when the provider id lands.
#[tokio::test]
async fn each_outcome_is_recorded_as_its_send_completes_and_early_receipts_wait() {
    use caremsg_plugin_host::{Event, ReceiptStatus};
    use caremsgd::gateways::inbound::{self, EventOutcome};
    let fake = Fake::start(201, None).await;
    let table = fake.table("fake", 2);
    let d = TestDaemon::start_with(|text| text + &table).await.unwrap();
    setup(&d, "fake").await;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    *fake.hold.lock().unwrap() = Some((arrived_tx, release.clone()));
    let ids = queue(&d, "fake", MOBILE, DeliveryPurpose::SmsAuth, None, 2).await;
    let state = d.daemon().state().clone();
    let pass = tokio::spawn(async move { outbox::run_once(&state, "fake").await });
    arrived.recv().await.unwrap();
    arrived.recv().await.unwrap();
    // The provider's receipt for its first message comes before any answer.
    let gateway = d
        .daemon()
        .state()
        .gateways
        .instance("fake")
        .unwrap()
        .clone();
    let early = |id: &str| Event::DeliveryReceipt {
        provider_message_id: id.to_owned(),
        status: ReceiptStatus::Delivered,
        error_code: None,
    };
    let outcomes = inbound::commit(
        d.daemon().state(),
        &gateway,
        vec![early("PROV-0"), early("PROV-1")],
    )
    .await
    .unwrap();
    assert_eq!(
        outcomes,
        vec![EventOutcome::ReceiptParked, EventOutcome::ReceiptParked]
    );
    // One answer comes back; the other send is still in flight.
    release.notify_one();
    let mut statuses = Vec::new();
    for _ in 0..500 {
        statuses = Vec::new();
        for id in &ids {
            statuses.push(get(&d, id).await.status);
        }
        if statuses.contains(&DeliveryStatus::Delivered) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        statuses.contains(&DeliveryStatus::Delivered)
            && statuses.contains(&DeliveryStatus::Sending),
        "the completed send is recorded (and its parked receipt applied) while the other is in flight: {statuses:?}"
    );
    *fake.hold.lock().unwrap() = None;
    release.notify_one();
    pass.await.unwrap().unwrap();
    let mut statuses: Vec<_> = Vec::new();
    for id in &ids {
        statuses.push(get(&d, id).await.status);
    }
    assert_eq!(
        statuses,
        vec![DeliveryStatus::Delivered, DeliveryStatus::Delivered]
    );
    d.stop().await.unwrap();
}

/// Issue #13 rule 9: an absurd `Retry-After` is clamped (to an hour) before it
/// becomes a pause or a retry instant: nothing overflows, nothing is reported as a
/// plugin panic.
#[tokio::test]
async fn an_absurd_retry_after_is_clamped() {
    let fake = Fake::start(429, Some(u64::MAX / 4)).await;
    let table = fake.table("fake", 1);
    let d = TestDaemon::start_with(|text| text + &table).await.unwrap();
    setup(&d, "fake").await;
    let ids = queue(&d, "fake", MOBILE, DeliveryPurpose::SmsAuth, None, 1).await;
    let now = d.clock.now();
    let report = outbox::run_once(d.daemon().state(), "fake").await.unwrap();
    let row = get(&d, &ids[0]).await;
    assert_eq!(row.status, DeliveryStatus::Queued, "{row:?}");
    assert_ne!(row.error_code.as_deref(), Some("plugin_panicked"));
    let hour = TimeDelta::hours(1);
    assert!(row.next_attempt_at >= now + hour, "{row:?}");
    assert!(
        row.next_attempt_at <= now + hour + TimeDelta::minutes(16),
        "{row:?}"
    );
    let paused = report.paused_until.expect("paused");
    assert!(paused <= now + hour, "{paused}");
    d.stop().await.unwrap();
}
