//! Issue #13: every patient text is kept and STOP is absolute at every edge — rate
//! limits, races, deactivations, early receipts. Everything enters through the real
//! HTTP API and the real loopback plugin (`/v1/hooks/loopback`), on SQLite or, with
//! `DATABASE_URL`, PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use caremsg_entities::{
    DeliveryChannel, DeliveryPurpose, DeliveryStatus, SmsAuthStatus, SmsStatus, TimerKind,
    delivery, inbound_receipt, message, patient, sms_auth_session, sms_consent, timer,
    unmatched_inbound,
};
use caremsg_plugin_host::{Event, ReceiptStatus};
use caremsg_tests::{
    ADMIN_TOKEN, PORTAL_TOKEN, STAFF_TOKEN, TestDaemon, patient_body, practice_body,
};
use caremsgd::clock::Clock;
use caremsgd::gateways::inbound::{self, EventOutcome};
use caremsgd::gateways::{consent, outbox};
use caremsgd::prune;
use reqwest::{Method, StatusCode};
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter,
};
use serde_json::{Value, json};

const MOBILE: &str = "+12015550123";

fn db(d: &TestDaemon) -> &DatabaseConnection {
    &d.daemon().state().db
}

fn number_of(practice: &str) -> String {
    practice_body(practice)["sms_numbers"][0]["number"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Posts a text from `from` to `practice`'s number through the loopback webhook.
async fn text_to(d: &TestDaemon, practice: &str, from: &str, body: &str, id: &str) {
    let response = d
        .http
        .post(format!("{}/v1/hooks/loopback", d.base))
        .json(&json!({"from": from, "to": number_of(practice), "body": body, "id": id}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_eq!(status, StatusCode::OK, "{}", response.text().await.unwrap());
}

async fn text(d: &TestDaemon, from: &str, body: &str, id: &str) {
    text_to(d, "p1", from, body, id).await;
}

async fn staff(
    d: &TestDaemon,
    user: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    d.call_as(method, path, Some(STAFF_TOKEN), Some(user), body.as_ref())
        .await
}

async fn sms_status(d: &TestDaemon, user: &str, patient: &str) -> String {
    let (status, view) = staff(
        d,
        user,
        Method::GET,
        &format!("/v1/staff/patients/{patient}/sms"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    view["status"].as_str().unwrap().to_owned()
}

/// The bodies of `patient`'s conversation, oldest first.
async fn conversation(d: &TestDaemon, user: &str, patient: &str) -> Vec<(String, String)> {
    let (status, page) = staff(
        d,
        user,
        Method::GET,
        &format!("/v1/staff/patients/{patient}/conversation?limit=200"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["direction"].as_str().unwrap().to_owned(),
                m["body"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Practice p1 with user u1 and patient pat1 (mobile MOBILE), SMS enabled through the
/// staff API and the patient's date-of-birth reply.
async fn enabled_clinic(d: &TestDaemon) {
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    d.patient("p1", "pat1", &[], &["u1"]).await;
    enable(d, "u1", "pat1", MOBILE, "dob-pat1").await;
}

/// Starts SMS for `patient` and confirms it with the date-of-birth reply from `phone`.
async fn enable(d: &TestDaemon, user: &str, patient: &str, phone: &str, id: &str) {
    let (status, body) = staff(
        d,
        user,
        Method::POST,
        &format!("/v1/staff/patients/{patient}/sms/start"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    text(d, phone, "04/07/1950", id).await;
    assert_eq!(sms_status(d, user, patient).await, "enabled");
}

/// Posts a text from MOBILE to p1 with provider id `id`: the status, whether a
/// `Retry-After` came with it, and the body.
async fn post_text(d: &TestDaemon, id: &str) -> (StatusCode, bool, String) {
    post_text_from(d, MOBILE, id).await
}

/// [`post_text`] from `from`.
async fn post_text_from(d: &TestDaemon, from: &str, id: &str) -> (StatusCode, bool, String) {
    let response = d
        .http
        .post(format!("{}/v1/hooks/loopback", d.base))
        .json(&json!({"from": from, "to": number_of("p1"), "body": "Are you there?", "id": id}))
        .send()
        .await
        .unwrap();
    let retry_after = response.headers().get("retry-after").is_some();
    (
        response.status(),
        retry_after,
        response.text().await.unwrap(),
    )
}

/// The messages stored with provider id `id`.
async fn stored_texts(d: &TestDaemon, id: &str) -> u64 {
    message::Entity::find()
        .filter(message::Column::ProviderMessageId.eq(id))
        .count(db(d))
        .await
        .unwrap()
}

/// A text that arrives while the database cannot be read (every reader connection
/// busy past `database.connect_timeout`) is refused with 503 and `Retry-After`, so
/// the provider retries, and nothing of it is stored; the retry, once the database
/// answers again, is stored once. (Every read of the inbound route fails the same
/// way: the practice's, the patient's, a retry's receipt lookup.)
#[tokio::test]
async fn a_text_the_database_cannot_read_for_is_refused_and_kept_on_retry() {
    const READERS: usize = 2;
    let d = TestDaemon::start_with(|text| {
        text.replacen(
            "[database]\n",
            &format!("[database]\nmax_connections = {READERS}\nconnect_timeout = \"1s\"\n"),
            1,
        )
    })
    .await
    .unwrap();
    enabled_clinic(&d).await;
    // Every reader connection taken (the test's own reads wait until they are back).
    let (mut sqlite, mut postgres) = (Vec::new(), Vec::new());
    match db(&d).get_database_backend() {
        sea_orm::DbBackend::Postgres => {
            let pool = db(&d).get_postgres_connection_pool();
            for _ in 0..READERS {
                postgres.push(pool.acquire().await.unwrap());
            }
        }
        _ => {
            let pool = db(&d).get_sqlite_connection_pool();
            for _ in 0..READERS {
                sqlite.push(pool.acquire().await.unwrap());
            }
        }
    }
    let (status, retry_after, body) = post_text(&d, "db-down-1").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("storage_unavailable"), "{body}");
    assert!(
        retry_after,
        "a refused text tells the provider when to retry"
    );
    drop((sqlite, postgres));
    assert_eq!(
        stored_texts(&d, "db-down-1").await,
        0,
        "nothing of a refused text is stored"
    );
    for _ in 0..2 {
        let (status, _, body) = post_text(&d, "db-down-1").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(
        stored_texts(&d, "db-down-1").await,
        1,
        "the retry is stored, once"
    );
    d.stop().await.unwrap();
}

/// A text whose receipt lookup cannot be read (the route found the practice; then the
/// read of `inbound_receipts` fails: the table is renamed away under the daemon) is
/// refused with 503 and `Retry-After` and leaves nothing in the unmatched log; the
/// provider's retry, once the table is back, is logged once (posted twice). The
/// test above fails the route's first read; this one fails a later read alone.
#[tokio::test]
async fn a_text_whose_receipt_cannot_be_read_is_refused_and_kept_on_retry() {
    const STRANGER: &str = "+12015550999";
    let d = TestDaemon::start().await.unwrap();
    enabled_clinic(&d).await;
    let post = |id: &'static str| post_text_from(&d, STRANGER, id);
    let logged = || async {
        unmatched_inbound::Entity::find()
            .filter(unmatched_inbound::Column::ProviderMessageId.eq("receipt-down-1"))
            .count(db(&d))
            .await
            .unwrap()
    };
    db(&d)
        .execute_unprepared("ALTER TABLE inbound_receipts RENAME TO inbound_receipts_away")
        .await
        .unwrap();
    let (status, retry_after, body) = post("receipt-down-1").await;
    db(&d)
        .execute_unprepared("ALTER TABLE inbound_receipts_away RENAME TO inbound_receipts")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("storage_unavailable"), "{body}");
    assert!(
        retry_after,
        "a refused text tells the provider when to retry"
    );
    assert_eq!(logged().await, 0, "nothing of a refused text is kept");
    for _ in 0..2 {
        let (status, _, body) = post("receipt-down-1").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(logged().await, 1, "the retry is kept, once");
    d.stop().await.unwrap();
}

/// Rule 1, the issue's reproduction: with the production example's kind of
/// per-sender limit, four quick texts and a STOP are all kept, and the STOP opts the
/// patient out.
#[tokio::test]
async fn a_burst_of_texts_and_stop_are_all_kept_whatever_the_limit() {
    let limit = "inbound_per_sender = { per_second = 0.5, burst = 3 }\n";
    let d = TestDaemon::start_with(|text| text + limit).await.unwrap();
    enabled_clinic(&d).await;
    for i in 0..4 {
        text(
            &d,
            MOBILE,
            &format!("part {i} of my question"),
            &format!("b{i}"),
        )
        .await;
    }
    text(&d, MOBILE, "STOP", "b-stop").await;
    let bodies = conversation(&d, "u1", "pat1").await;
    for i in 0..4 {
        let wanted = format!("part {i} of my question");
        assert!(
            bodies
                .iter()
                .any(|(dir, body)| dir == "from_patient" && *body == wanted),
            "text {i} was lost: {bodies:?}"
        );
    }
    assert_eq!(sms_status(&d, "u1", "pat1").await, "opted_out");
    // The opt-out confirmation is queued: keywords are never throttled.
    let confirmations = delivery::Entity::find()
        .filter(delivery::Column::Recipient.eq(MOBILE))
        .filter(delivery::Column::Subject.eq("opt_out_confirmation"))
        .count(db(&d))
        .await
        .unwrap();
    assert_eq!(confirmations, 1);
    d.stop().await.unwrap();
}

/// Rule 1: what the per-sender limit throttles is caremsg's automatic answers; each
/// throttled answer is counted and shown, and the texts themselves are all stored.
#[tokio::test]
async fn only_automatic_answers_are_throttled_and_each_is_recorded() {
    let limit = "inbound_per_sender = { per_second = 0.001, burst = 2 }\n";
    let d = TestDaemon::start_with(|text| text + limit).await.unwrap();
    enabled_clinic(&d).await;
    // An enabled patient asking for HELP four times: two answers, two throttled.
    for i in 0..4 {
        text(&d, MOBILE, "HELP", &format!("h{i}")).await;
    }
    let bodies = conversation(&d, "u1", "pat1").await;
    let throttled_notes = bodies
        .iter()
        .filter(|(dir, body)| dir == "system" && body.contains("not sent"))
        .count();
    assert_eq!(throttled_notes, 2, "{bodies:?}");
    // A stranger's texts are all kept in the unmatched log; its HELP answers are
    // throttled and marked so.
    let stranger = "+12015550177";
    for i in 0..4 {
        text(&d, stranger, "HELP", &format!("s{i}")).await;
    }
    let rows = unmatched_inbound::Entity::find()
        .filter(unmatched_inbound::Column::FromPhone.eq(stranger))
        .all(db(&d))
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    let answered = |what: &str| {
        rows.iter()
            .filter(|r| r.answered.as_deref() == Some(what))
            .count()
    };
    assert_eq!(answered("help"), 2, "{rows:?}");
    assert_eq!(answered("help_throttled"), 2, "{rows:?}");
    let metric = r#"caremsg_sms_answers_throttled_total{gateway="loopback"}"#;
    assert_eq!(d.metric(metric).await, 4.0);
    d.stop().await.unwrap();
}

async fn timers_of(d: &TestDaemon, patient: &str) -> Vec<timer::Model> {
    timer::Entity::find()
        .filter(timer::Column::PatientId.eq(patient))
        .all(db(d))
        .await
        .unwrap()
}

/// Rule 3: deactivating a practice does for all its patients what deactivating a
/// patient does — sessions end, timers are cancelled, queued texts are refused — and
/// the dispatcher's claim refuses any delivery of the inactive practice.
#[tokio::test]
async fn deactivating_a_practice_stops_everything_for_its_patients() {
    // One text per recipient goes at once; the next waits (the clock never moves).
    let limit = "per_recipient = { per_second = 0.001, burst = 1 }\n";
    let d = TestDaemon::start_with(|text| text + limit).await.unwrap();
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    d.patient("p1", "pat1", &[], &["u1"]).await;
    let path = |what: &str| format!("/v1/staff/patients/pat1/sms/{what}");
    let (status, body) = staff(&d, "u1", Method::POST, &path("start"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = staff(&d, "u1", Method::POST, &path("resend"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let state = d.daemon().state();
    outbox::run_once(state, "loopback").await.unwrap();
    let queued = || {
        delivery::Entity::find()
            .filter(delivery::Column::PracticeId.eq("p1"))
            .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
            .count(db(&d))
    };
    assert_eq!(queued().await.unwrap(), 1, "the resent text waits");
    assert!(timers_of(&d, "pat1").await.iter().any(|t| !t.fired));

    let (status, body) = d
        .call(
            Method::DELETE,
            "/v1/admin/practices/p1",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(queued().await.unwrap(), 0);
    let refused = delivery::Entity::find()
        .filter(delivery::Column::PracticeId.eq("p1"))
        .filter(delivery::Column::ErrorCode.eq("practice_inactive"))
        .count(db(&d))
        .await
        .unwrap();
    assert_eq!(refused, 1);
    assert!(timers_of(&d, "pat1").await.iter().all(|t| t.fired));
    let pending = sms_auth_session::Entity::find()
        .filter(sms_auth_session::Column::PatientId.eq("pat1"))
        .filter(sms_auth_session::Column::Status.eq(SmsAuthStatus::Pending))
        .count(db(&d))
        .await
        .unwrap();
    assert_eq!(pending, 0);
    // A delivery that appears anyway (queued by a racing writer) is refused at claim.
    let now = d.clock.now();
    delivery::Entity::insert(delivery::ActiveModel {
        id: Set("late".into()),
        message_id: Set(None),
        notification_id: Set(None),
        patient_id: Set(Some("pat1".into())),
        practice_id: Set("p1".into()),
        channel: Set(DeliveryChannel::Sms),
        purpose: Set(DeliveryPurpose::SmsAuth),
        gateway: Set(Some("loopback".into())),
        recipient: Set(Some("+12015550999".into())),
        from_number: Set(Some(number_of("p1"))),
        subject: Set(Some("opt_out_confirmation".into())),
        body: Set(Some("x".into())),
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
    .exec_without_returning(db(&d))
    .await
    .unwrap();
    outbox::run_once(state, "loopback").await.unwrap();
    let late = delivery::Entity::find_by_id("late".to_owned())
        .one(db(&d))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(late.status, DeliveryStatus::Refused);
    assert_eq!(late.error_code.as_deref(), Some("practice_inactive"));
    d.stop().await.unwrap();
}

/// A patient of `practice` with its own mobile number.
async fn patient_with_phone(d: &TestDaemon, practice: &str, id: &str, phone: &str) {
    let mut body = patient_body(practice, &[], &["u1"]);
    body["mobile_phone"] = json!(phone);
    let (status, out) = d.admin_put(&format!("/v1/admin/patients/{id}"), body).await;
    assert_eq!(status, StatusCode::OK, "{out}");
}

/// Rule 6: one mobile number, one pending-or-enabled patient per practice, enforced
/// by the database: two staff starting SMS for two patients with the same number at
/// the same moment get one success and one 409 `phone_in_use`, every time.
#[tokio::test]
async fn concurrent_starts_on_one_number_give_one_success_and_one_conflict() {
    let d = TestDaemon::start().await.unwrap();
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    d.user("p1", "u2", &[]).await;
    for round in 0..6 {
        let phone = format!("+1201555{:04}", 300 + round);
        let (a, b) = (format!("a{round}"), format!("b{round}"));
        patient_with_phone(&d, "p1", &a, &phone).await;
        patient_with_phone(&d, "p1", &b, &phone).await;
        let start = |user: &'static str, patient: String| {
            let d = &d;
            async move {
                staff(
                    d,
                    user,
                    Method::POST,
                    &format!("/v1/staff/patients/{patient}/sms/start"),
                    None,
                )
                .await
            }
        };
        let (ra, rb) = tokio::join!(start("u1", a.clone()), start("u2", b.clone()));
        let mut statuses = [ra.0, rb.0];
        statuses.sort();
        assert_eq!(
            statuses,
            [StatusCode::OK, StatusCode::CONFLICT],
            "round {round}: {ra:?} {rb:?}"
        );
        let conflict = if ra.0 == StatusCode::CONFLICT {
            &ra.1
        } else {
            &rb.1
        };
        assert_eq!(conflict["error"]["code"], "phone_in_use", "{conflict}");
        let pending = patient::Entity::find()
            .filter(patient::Column::MobilePhone.eq(phone.as_str()))
            .filter(patient::Column::SmsStatus.is_in([SmsStatus::Pending, SmsStatus::Enabled]))
            .count(db(&d))
            .await
            .unwrap();
        assert_eq!(pending, 1, "round {round}");
    }
    d.stop().await.unwrap();
}

/// Rule 7: an unmatched number's STOP is confirmed once, also when two STOPs arrive
/// together.
#[tokio::test]
async fn two_stops_at_once_from_an_unknown_number_are_confirmed_once() {
    let d = TestDaemon::start().await.unwrap();
    d.practice("p1").await;
    for round in 0..6 {
        let stranger = format!("+1201555{:04}", 700 + round);
        let (ida, idb) = (format!("x{round}a"), format!("x{round}b"));
        tokio::join!(
            text(&d, &stranger, "STOP", &ida),
            text(&d, &stranger, "stop", &idb),
        );
        let confirmations = delivery::Entity::find()
            .filter(delivery::Column::Recipient.eq(stranger.as_str()))
            .filter(delivery::Column::Subject.eq("opt_out_confirmation"))
            .count(db(&d))
            .await
            .unwrap();
        assert_eq!(confirmations, 1, "round {round}");
        let kept = unmatched_inbound::Entity::find()
            .filter(unmatched_inbound::Column::FromPhone.eq(stranger.as_str()))
            .count(db(&d))
            .await
            .unwrap();
        assert_eq!(kept, 2, "both texts are kept");
    }
    d.stop().await.unwrap();
}

/// Rule 8: a carrier's opt-out report commits a durable follow-up with the number's
/// opt-out, so a crash before the patients are told cannot leave one `enabled`: the
/// timer service tells them after the restart.
#[tokio::test]
async fn a_carrier_opt_out_interrupted_by_a_crash_is_completed_after_restart() {
    let mut d = TestDaemon::start().await.unwrap();
    enabled_clinic(&d).await;
    // The first step of the report alone, as if the process died right after it.
    let now = d.clock.now();
    d.daemon()
        .state()
        .writer
        .write(consent::number_opted_out("p1", MOBILE, now))
        .await
        .unwrap();
    assert_eq!(sms_status(&d, "u1", "pat1").await, "enabled");
    d.restart().await.unwrap();
    d.daemon().tick_timers().await.unwrap();
    assert_eq!(sms_status(&d, "u1", "pat1").await, "opted_out");
    let follow_up = timer::Entity::find()
        .filter(timer::Column::Kind.eq(TimerKind::CarrierOptOut))
        .one(db(&d))
        .await
        .unwrap()
        .unwrap();
    assert!(follow_up.fired);
    d.stop().await.unwrap();
}

/// Rule 8, the race: the follow-up found the patient on the reported number, but
/// the number changed before the patient's actor took the report. The report is
/// about the number, not the patient: the patient, now on another number, is left as
/// is (the reported number itself was opted out by the first step).
#[tokio::test]
async fn a_carrier_opt_out_for_a_number_the_patient_no_longer_has_changes_nothing() {
    let d = TestDaemon::start().await.unwrap();
    enabled_clinic(&d).await;
    let state = d.daemon().state();
    assert!(consent::tell_patients(state, "test", "+12015550177", &["pat1".to_owned()]).await);
    assert_eq!(sms_status(&d, "u1", "pat1").await, "enabled");
    assert!(consent::tell_patients(state, "test", MOBILE, &["pat1".to_owned()]).await);
    assert_eq!(sms_status(&d, "u1", "pat1").await, "opted_out");
    d.stop().await.unwrap();
}

/// Rule 5: deleting patient `pat_1` cancels its timers only — not those of `patX1`
/// or `PAT_1` (`_` is a LIKE wildcard and SQLite's LIKE ignores case).
#[tokio::test]
async fn deleting_a_patient_cancels_only_its_own_timers() {
    let d = TestDaemon::start().await.unwrap();
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    let (status, body) = staff(
        &d,
        "u1",
        Method::PUT,
        "/v1/staff/settings/notifications",
        Some(json!({"unread_reminder": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for id in ["pat_1", "patX1", "PAT_1"] {
        d.patient("p1", id, &[], &["u1"]).await;
        let (status, out) = d
            .call(
                Method::POST,
                &format!("/v1/portal/patients/{id}/messages"),
                Some(PORTAL_TOKEN),
                Some(&json!({"body": "A question"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{out}");
        assert_eq!(timers_of(&d, id).await.len(), 1, "{id}'s reminder");
    }
    let (status, body) = d
        .call(
            Method::DELETE,
            "/v1/admin/patients/pat_1",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(timers_of(&d, "pat_1").await.iter().all(|t| t.fired));
    for other in ["patX1", "PAT_1"] {
        assert!(
            timers_of(&d, other).await.iter().all(|t| !t.fired),
            "{other}'s reminder was cancelled"
        );
    }
    d.stop().await.unwrap();
}

/// Rule 10: fired timers, inbound receipts and unmatched texts older than their
/// retention are pruned (through the writer, in batches); messages are never pruned.
#[tokio::test]
async fn old_operational_rows_are_pruned_and_records_are_kept() {
    let settings =
        "\n[retention]\noperational = \"2days\"\nunmatched_inbound = \"1day\"\nprune_batch = 2\n";
    let d = TestDaemon::start_with(|text| {
        // Before the first [[gateways]] table, so it is a section of its own.
        let at = text.find("[[gateways]]").unwrap();
        format!("{}{settings}\n{}", &text[..at], &text[at..])
    })
    .await
    .unwrap();
    enabled_clinic(&d).await;
    for i in 0..5 {
        text(&d, MOBILE, &format!("kept {i}"), &format!("k{i}")).await;
        text(&d, "+12015550177", "who is this", &format!("u{i}")).await;
    }
    let state = d.daemon().state();
    let receipts = || inbound_receipt::Entity::find().count(db(&d));
    let unmatched = || unmatched_inbound::Entity::find().count(db(&d));
    let messages = || message::Entity::find().count(db(&d));
    let before = (
        receipts().await.unwrap(),
        unmatched().await.unwrap(),
        messages().await.unwrap(),
    );
    assert_eq!(before.1, 5);
    // A day and a half later: only unmatched texts are past their retention.
    d.clock.advance(chrono::TimeDelta::hours(36));
    let pruned = prune::run_once(state, d.clock.now()).await.unwrap();
    assert_eq!(pruned.unmatched_inbound, 5);
    assert_eq!(pruned.inbound_receipts, 0);
    assert_eq!(unmatched().await.unwrap(), 0);
    assert_eq!(receipts().await.unwrap(), before.0);
    // Three days later: the receipts (and fired timers) go too; messages stay.
    d.clock.advance(chrono::TimeDelta::hours(36));
    let pruned = prune::run_once(state, d.clock.now()).await.unwrap();
    assert_eq!(pruned.inbound_receipts, before.0);
    assert_eq!(receipts().await.unwrap(), 0);
    assert_eq!(messages().await.unwrap(), before.2);
    d.stop().await.unwrap();
}

/// Issue #14 item 12: a Twilio-style status callback's carrier opt-out (a failed
/// receipt with 21610, and the bare number's opt-out beside it) applies only to a
/// delivery caremsg sent, only to that delivery's practice and number, never over a
/// newer consent event (the patient's START after the failed send wins), and a
/// replayed callback changes nothing.
#[tokio::test]
async fn status_callback_opt_outs_are_scoped_and_replay_proof() {
    let d = TestDaemon::start().await.unwrap();
    enabled_clinic(&d).await;
    d.practice("p2").await;
    let state = d.daemon().state();
    let gateway = state.gateways.instance("loopback").unwrap().clone();
    let callback = |sid: &str| {
        vec![
            Event::DeliveryReceipt {
                provider_message_id: sid.to_owned(),
                status: ReceiptStatus::Failed,
                error_code: Some("21610".to_owned()),
            },
            Event::OptOut {
                number: MOBILE.to_owned(),
            },
        ]
    };
    let opted_out = |practice: &'static str| {
        let db = db(&d).clone();
        async move {
            sms_consent::Entity::find_by_id((practice.to_owned(), MOBILE.to_owned()))
                .one(&db)
                .await
                .unwrap()
                .is_some_and(|c| c.opted_out)
        }
    };
    // An unknown message sid: nothing is opted out anywhere.
    let outcomes = inbound::commit(state, &gateway, callback("SM-unknown"))
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![EventOutcome::ReceiptParked, EventOutcome::OptOutScoped]
    );
    assert!(!opted_out("p1").await && !opted_out("p2").await);
    assert_eq!(sms_status(&d, "u1", "pat1").await, "enabled");

    // A staff text caremsg sent (its provider id recorded), then the callback.
    let (status, body) = staff(
        &d,
        "u1",
        Method::POST,
        "/v1/staff/patients/pat1/messages",
        Some(json!({"body": "Your results are in.", "client_txn_id": "t1"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    outbox::run_once(state, "loopback").await.unwrap();
    let sent = delivery::Entity::find()
        .filter(delivery::Column::Recipient.eq(MOBILE))
        .filter(delivery::Column::Purpose.eq(DeliveryPurpose::Message))
        .one(db(&d))
        .await
        .unwrap()
        .unwrap();
    let sid = sent.provider_message_id.clone().expect("sent with an id");
    let outcomes = inbound::commit(state, &gateway, callback(&sid))
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![EventOutcome::ReceiptApplied, EventOutcome::OptOutScoped]
    );
    assert!(opted_out("p1").await, "the delivery's practice");
    assert!(!opted_out("p2").await, "no other practice on the gateway");
    assert_eq!(sms_status(&d, "u1", "pat1").await, "opted_out");

    // The patient texts START; the same callback replayed changes nothing.
    d.clock.advance(chrono::TimeDelta::minutes(5));
    text(&d, MOBILE, "START", "start-1").await;
    assert!(!opted_out("p1").await);
    let outcomes = inbound::commit(state, &gateway, callback(&sid))
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![EventOutcome::Duplicate, EventOutcome::OptOutScoped]
    );
    assert!(!opted_out("p1").await, "START wins over a replay");
    assert_eq!(sms_status(&d, "u1", "pat1").await, "pending");

    // A first, late callback about a text sent before the patient's newest consent
    // change is not applied over it.
    text(&d, MOBILE, "04/07/1950", "dob-2").await;
    assert_eq!(sms_status(&d, "u1", "pat1").await, "enabled");
    let (status, body) = staff(
        &d,
        "u1",
        Method::POST,
        "/v1/staff/patients/pat1/messages",
        Some(json!({"body": "See you Tuesday.", "client_txn_id": "t2"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    outbox::run_once(state, "loopback").await.unwrap();
    let second = delivery::Entity::find()
        .filter(delivery::Column::Recipient.eq(MOBILE))
        .filter(delivery::Column::Purpose.eq(DeliveryPurpose::Message))
        .filter(delivery::Column::Status.eq(DeliveryStatus::Sent))
        .one(db(&d))
        .await
        .unwrap()
        .unwrap();
    let sid2 = second.provider_message_id.clone().unwrap();
    d.clock.advance(chrono::TimeDelta::minutes(5));
    text(&d, MOBILE, "STOP", "stop-2").await;
    text(&d, MOBILE, "START", "start-2").await;
    assert_eq!(sms_status(&d, "u1", "pat1").await, "pending");
    let outcomes = inbound::commit(state, &gateway, callback(&sid2))
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![EventOutcome::ReceiptApplied, EventOutcome::OptOutScoped]
    );
    assert!(!opted_out("p1").await, "the newer START wins");
    assert_eq!(sms_status(&d, "u1", "pat1").await, "pending");
    d.stop().await.unwrap();
}
