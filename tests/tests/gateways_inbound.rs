//! The inbound side end to end: replies posted to the loopback hook are stored once
//! (into the conversation of an enabled patient, else the unmatched-inbound log),
//! whatever the sender's rate (only automatic answers are limited), delivery receipts
//! move a delivery forward only, and an opt-out event opts the number out.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use caremsg_entities::{
    DeliveryChannel, DeliveryPurpose, DeliveryStatus, SmsStatus, delivery, inbound_receipt,
    message, patient, sms_consent, sms_status_history, unmatched_inbound,
};
use caremsg_plugin_host::{Event, ReceiptStatus};
use caremsg_tests::{TestDaemon, practice_body};
use caremsgd::clock::Clock;
use caremsgd::gateways::inbound::{self, EventOutcome};
use reqwest::StatusCode;
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter,
};
use serde_json::{Value, json};

const MOBILE: &str = "+12015550123";

fn db(d: &TestDaemon) -> &DatabaseConnection {
    &d.daemon().state().db
}

fn practice_number() -> String {
    practice_body("p1")["sms_numbers"][0]["number"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn setup(d: &TestDaemon, sms_status: SmsStatus) {
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    d.patient("p1", "pat1", &[], &["u1"]).await;
    patient::Entity::update_many()
        .col_expr(patient::Column::SmsStatus, Expr::value(sms_status))
        .filter(patient::Column::Id.eq("pat1"))
        .exec(db(d))
        .await
        .unwrap();
}

/// POSTs a simulated reply to the loopback hook.
async fn reply(d: &TestDaemon, body: &Value) -> (StatusCode, String) {
    let response = d
        .http
        .post(format!("{}/v1/hooks/loopback", d.base))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test]
async fn a_reply_posted_twice_reaches_the_conversation_once() {
    let d = TestDaemon::start().await.unwrap();
    setup(&d, SmsStatus::Enabled).await;
    let body = json!({"from": MOBILE, "to": practice_number(), "body": "Thank you!", "id": "r1"});
    // Twice in a row, then twice at once.
    for _ in 0..2 {
        let (status, text) = reply(&d, &body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    let (a, b) = tokio::join!(reply(&d, &body), reply(&d, &body));
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK));
    let stored = message::Entity::find()
        .filter(message::Column::ProviderMessageId.eq("r1"))
        .all(db(&d))
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].patient_id, "pat1");
    assert_eq!(stored[0].body, "Thank you!");
    assert_eq!(stored[0].gateway.as_deref(), Some("loopback"));
    assert_eq!(
        unmatched_inbound::Entity::find()
            .count(db(&d))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        inbound_receipt::Entity::find().count(db(&d)).await.unwrap(),
        1
    );
    d.stop().await.unwrap();
}

/// A sender's number as the provider gave it need not be E.164: the practice's
/// country normalises it before the patient is looked for. Only an exact E.164 is
/// looked for in the statement that finds the practice; any other form is looked for
/// again, normalised, and reaches the same conversation. A number that matches no
/// patient either way goes to the unmatched log, normalised.
#[tokio::test]
async fn a_text_from_the_patients_number_in_any_format_reaches_the_conversation() {
    let d = TestDaemon::start().await.unwrap();
    setup(&d, SmsStatus::Enabled).await;
    let forms = [MOBILE, "(201) 555-0123", "+1 201 555 0123", "2015550123"];
    for (i, from) in forms.iter().enumerate() {
        let body = json!({"from": from, "to": practice_number(), "body": "Thank you!", "id": format!("f{i}")});
        let (status, text) = reply(&d, &body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    let stored = message::Entity::find()
        .filter(message::Column::PatientId.eq("pat1"))
        .filter(message::Column::Direction.eq(caremsg_entities::Direction::FromPatient))
        .all(db(&d))
        .await
        .unwrap();
    assert_eq!(
        stored.len(),
        forms.len(),
        "every form reaches pat1's conversation"
    );
    let body = json!({"from": "(201) 555-0199", "to": practice_number(), "body": "Hello?", "id": "f-other"});
    let (status, text) = reply(&d, &body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let unmatched = unmatched_inbound::Entity::find().all(db(&d)).await.unwrap();
    assert_eq!(unmatched.len(), 1);
    assert_eq!(unmatched[0].from_phone, "+12015550199");
    d.stop().await.unwrap();
}

/// A provider's retry of a text that was no conversation message the first time (kept
/// in the unmatched log while the patient was pending) is still a duplicate once the
/// patient's texts are conversation messages: answered 200, stored nowhere again.
#[tokio::test]
async fn a_retried_text_first_kept_elsewhere_stays_a_duplicate() {
    let d = TestDaemon::start().await.unwrap();
    setup(&d, SmsStatus::Pending).await;
    let body = json!({"from": MOBILE, "to": practice_number(), "body": "Who is this?", "id": "x1"});
    let (status, text) = reply(&d, &body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    setup(&d, SmsStatus::Enabled).await;
    for _ in 0..2 {
        let (status, text) = reply(&d, &body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    let stored = |id: &'static str| {
        message::Entity::find()
            .filter(message::Column::ProviderMessageId.eq(id))
            .count(db(&d))
    };
    assert_eq!(
        stored("x1").await.unwrap(),
        0,
        "the retry became a conversation message"
    );
    assert_eq!(
        inbound_receipt::Entity::find().count(db(&d)).await.unwrap(),
        1
    );
    assert_eq!(
        unmatched_inbound::Entity::find()
            .count(db(&d))
            .await
            .unwrap(),
        1
    );
    // A new text from the same number is a conversation message.
    let new = json!({"from": MOBILE, "to": practice_number(), "body": "Who is this?", "id": "x2"});
    let (status, text) = reply(&d, &new).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(stored("x2").await.unwrap(), 1);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_reply_from_an_unknown_number_is_kept_once_for_operators() {
    let d = TestDaemon::start().await.unwrap();
    setup(&d, SmsStatus::Enabled).await;
    let from_stranger =
        json!({"from": "+12015550177", "to": practice_number(), "body": "who is this", "id": "u1"});
    let from_other =
        json!({"from": "+12015550178", "to": practice_number(), "body": "hello?", "id": "u2"});
    for body in [&from_stranger, &from_stranger, &from_other] {
        let (status, text) = reply(&d, body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    let (a, b) = tokio::join!(reply(&d, &from_other), reply(&d, &from_other));
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK));
    let rows = unmatched_inbound::Entity::find().all(db(&d)).await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in &rows {
        assert_eq!(row.practice_id.as_deref(), Some("p1"));
        assert_eq!(row.gateway, "loopback");
    }
    assert_eq!(message::Entity::find().count(db(&d)).await.unwrap(), 0);

    // The hook's own errors.
    let response = d
        .http
        .post(format!("{}/v1/hooks/nonesuch", d.base))
        .json(&from_stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let limit = d.daemon().state().settings.load().server.max_body_bytes;
    let response = d
        .http
        .post(format!("{}/v1/hooks/loopback", d.base))
        .body(vec![b' '; limit + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn requests_the_plugin_refuses_store_nothing_and_are_counted() {
    let d = TestDaemon::start().await.unwrap();
    setup(&d, SmsStatus::Enabled).await;
    let not_json = d
        .http
        .post(format!("{}/v1/hooks/loopback", d.base))
        .body("from=+12015550123")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    let wrong_method = d
        .http
        .put(format!("{}/v1/hooks/loopback", d.base))
        .json(&json!({"from": MOBILE, "to": practice_number(), "body": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(message::Entity::find().count(db(&d)).await.unwrap(), 0);
    assert_eq!(
        unmatched_inbound::Entity::find()
            .count(db(&d))
            .await
            .unwrap(),
        0
    );
    let rejects = |status: &str| {
        format!(r#"caremsg_webhook_rejects_total{{gateway="loopback",status="{status}"}}"#)
    };
    assert_eq!(d.metric(&rejects("400")).await, 1.0);
    assert_eq!(d.metric(&rejects("405")).await, 1.0);
    // An accepted reply is not a reject.
    let body = json!({"from": MOBILE, "to": practice_number(), "body": "hi", "id": "ok1"});
    assert_eq!(reply(&d, &body).await.0, StatusCode::OK);
    assert_eq!(d.metric(&rejects("400")).await, 1.0);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_sender_over_the_answer_limit_still_has_every_text_kept() {
    let limit = "auto_answers_per_sender = { per_second = 0.001, burst = 2 }\n";
    let d = TestDaemon::start_with(|text| text + limit).await.unwrap();
    setup(&d, SmsStatus::None).await;
    for i in 0..4 {
        let body = json!({"from": "+12015550177", "to": practice_number(), "body": "spam", "id": format!("s{i}")});
        let (status, text) = reply(&d, &body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    let other = json!({"from": "+12015550178", "to": practice_number(), "body": "hi", "id": "o1"});
    assert_eq!(reply(&d, &other).await.0, StatusCode::OK);
    let from = |n: &str| {
        unmatched_inbound::Entity::find()
            .filter(unmatched_inbound::Column::FromPhone.eq(n.to_owned()))
            .count(db(&d))
    };
    assert_eq!(from("+12015550177").await.unwrap(), 4);
    assert_eq!(from("+12015550178").await.unwrap(), 1);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn delivery_receipts_move_a_delivery_forward_only() {
    let d = TestDaemon::start().await.unwrap();
    setup(&d, SmsStatus::Enabled).await;
    let now = d.clock.now();
    let row = |id: &str, status, provider: &str| delivery::ActiveModel {
        id: Set(id.to_owned()),
        message_id: Set(None),
        notification_id: Set(None),
        patient_id: Set(Some("pat1".into())),
        practice_id: Set("p1".into()),
        channel: Set(DeliveryChannel::Sms),
        purpose: Set(DeliveryPurpose::SmsAuth),
        gateway: Set(Some("loopback".into())),
        recipient: Set(Some(MOBILE.into())),
        from_number: Set(Some(practice_number())),
        subject: Set(None),
        body: Set(Some("x".into())),
        status: Set(status),
        attempts: Set(1),
        next_attempt_at: Set(now),
        claimed_at: Set(Some(now)),
        provider_message_id: Set(Some(provider.to_owned())),
        error_code: Set(None),
        error_reason: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    };
    for model in [
        row("d1", DeliveryStatus::Sent, "P1"),
        row("d2", DeliveryStatus::Sent, "P2"),
    ] {
        delivery::Entity::insert(model)
            .exec_without_returning(db(&d))
            .await
            .unwrap();
    }
    let state = d.daemon().state();
    let gateway = state.gateways.instance("loopback").unwrap().clone();
    let receipt = |id: &str, status, code: Option<&str>| Event::DeliveryReceipt {
        provider_message_id: id.to_owned(),
        status,
        error_code: code.map(str::to_owned),
    };
    let database = db(&d).clone();
    let status_of = |id: &'static str| {
        let database = database.clone();
        async move {
            delivery::Entity::find_by_id(id.to_owned())
                .one(&database)
                .await
                .unwrap()
                .unwrap()
        }
    };
    // (event, expected outcome, delivery, its status after)
    let cases = [
        (
            receipt("P1", ReceiptStatus::Delivered, None),
            EventOutcome::ReceiptApplied,
            "d1",
            DeliveryStatus::Delivered,
        ),
        (
            receipt("P1", ReceiptStatus::Sent, None),
            EventOutcome::ReceiptIgnored,
            "d1",
            DeliveryStatus::Delivered,
        ),
        (
            receipt("P1", ReceiptStatus::Failed, Some("30003")),
            EventOutcome::ReceiptIgnored,
            "d1",
            DeliveryStatus::Delivered,
        ),
        (
            receipt("P2", ReceiptStatus::Sent, None),
            EventOutcome::ReceiptIgnored,
            "d2",
            DeliveryStatus::Sent,
        ),
        (
            receipt("P2", ReceiptStatus::Undelivered, Some("30005")),
            EventOutcome::ReceiptApplied,
            "d2",
            DeliveryStatus::Undelivered,
        ),
        (
            receipt("P2", ReceiptStatus::Delivered, None),
            EventOutcome::ReceiptIgnored,
            "d2",
            DeliveryStatus::Undelivered,
        ),
        (
            receipt("NOPE", ReceiptStatus::Delivered, None),
            EventOutcome::ReceiptParked,
            "d1",
            DeliveryStatus::Delivered,
        ),
        // A replayed receipt changes nothing.
        (
            receipt("P2", ReceiptStatus::Undelivered, Some("30005")),
            EventOutcome::Duplicate,
            "d2",
            DeliveryStatus::Undelivered,
        ),
    ];
    for (event, expected, id, after) in cases {
        let label = format!("{event:?}");
        let outcomes = inbound::commit(state, &gateway, vec![event]).await.unwrap();
        assert_eq!(outcomes, vec![expected], "{label}");
        assert_eq!(status_of(id).await.status, after, "{label}");
    }
    assert_eq!(status_of("d2").await.error_code.as_deref(), Some("30005"));
    d.stop().await.unwrap();
}

#[tokio::test]
async fn an_opt_out_event_opts_the_number_out_of_the_practice() {
    let d = TestDaemon::start().await.unwrap();
    setup(&d, SmsStatus::Enabled).await;
    let state = d.daemon().state();
    let gateway = state.gateways.instance("loopback").unwrap().clone();
    let outcomes = inbound::commit(
        state,
        &gateway,
        vec![Event::OptOut {
            number: MOBILE.to_owned(),
        }],
    )
    .await
    .unwrap();
    assert_eq!(outcomes, vec![EventOutcome::OptedOut]);
    let consent = sms_consent::Entity::find_by_id(("p1".to_owned(), MOBILE.to_owned()))
        .one(db(&d))
        .await
        .unwrap()
        .unwrap();
    assert!(consent.opted_out);
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
    let history = sms_status_history::Entity::find()
        .filter(sms_status_history::Column::PatientId.eq("pat1"))
        .all(db(&d))
        .await
        .unwrap();
    assert!(history.iter().any(|h| h.status == SmsStatus::OptedOut));
    d.stop().await.unwrap();
}

/// The database reads of a text from an enabled patient, the actor warm (issue #15:
/// the costliest request kind of the clinic benchmark): the practice by its number
/// with the patient on the sender's number as the provider gave it (E.164: one
/// read) and the notification recipients. The actor reads the patient with its
/// practice for its first text only: a text stored as a conversation message changes
/// neither row, so it keeps them for the next. A provider's retry is not
/// looked for first: the receipt's and the message's unique keys refuse it, and only
/// then are the message and the receipt looked up. No session or consent row is read
/// for a text that is no keyword.
/// Background work only adds reads, so the fewest of five tries is the text's own.
#[tokio::test]
async fn a_warm_conversation_text_reads_only_what_it_must() {
    let d = warm_daemon().await;
    let own = fewest_reads_of_a_text(&d, 0, Before::Nothing).await;
    println!("reads: conversation text {own}");
    assert!(own <= 2.0, "a conversation text: {own} reads");
    d.stop().await.unwrap();
}

/// The rows a conversation text leaves its actor are used only until an admin request
/// writes: the text after any admin write reads the patient with its practice again
/// (one read more than a text after a text).
#[tokio::test]
async fn after_an_admin_write_a_text_reads_the_patient_again() {
    assert_the_next_text_reads_again(Before::AnAdminWrite).await;
}

/// A text that fails (its receipt's table renamed away under the daemon, so neither
/// its write nor the lookup after it can run) makes the actor forget the rows it
/// kept: the text after it reads the patient with its practice again.
#[tokio::test]
async fn after_a_failed_text_the_next_reads_the_patient_again() {
    assert_the_next_text_reads_again(Before::AFailedText).await;
}

/// A text after `before` reads at least one statement more than a text after a text.
async fn assert_the_next_text_reads_again(before: Before) {
    let d = warm_daemon().await;
    let warm = fewest_reads_of_a_text(&d, 0, Before::Nothing).await;
    let after = fewest_reads_of_a_text(&d, 10, before).await;
    assert!(
        after >= warm + 1.0,
        "after {before:?} {after} reads, after a text {warm}"
    );
    d.stop().await.unwrap();
}

/// A daemon whose enabled patient's actor has taken one text.
async fn warm_daemon() -> TestDaemon {
    let d = TestDaemon::start().await.unwrap();
    setup(&d, SmsStatus::Enabled).await;
    let (status, _) = reply(&d, &warm_text(99)).await;
    assert_eq!(status, StatusCode::OK);
    d
}

/// A text from the enabled patient with provider id `w<i>`.
fn warm_text(i: usize) -> Value {
    json!({"from": MOBILE, "to": practice_number(), "body": "Thank you!", "id": format!("w{i}")})
}

/// What comes before each text whose reads are counted.
#[derive(Debug, Clone, Copy)]
enum Before {
    Nothing,
    /// A re-upsert of the care-team user.
    AnAdminWrite,
    /// A text that fails: its receipt's table is renamed away, then back.
    AFailedText,
}

/// The fewest reads of five texts (ids from `first`), each after `before`.
/// Background work only adds reads, so the fewest is the text's own.
async fn fewest_reads_of_a_text(d: &TestDaemon, first: usize, before: Before) -> f64 {
    let reads = "caremsg_db_reader_statements_total";
    let (mut scrape, mut fewest) = (f64::MAX, f64::MAX);
    for i in first..first + 5 {
        match before {
            Before::Nothing => {}
            Before::AnAdminWrite => d.user("p1", "u1", &[]).await,
            Before::AFailedText => {
                let rename = |from: &str, to: &str| format!("ALTER TABLE {from} RENAME TO {to}");
                db(d)
                    .execute_unprepared(&rename("inbound_receipts", "inbound_receipts_away"))
                    .await
                    .unwrap();
                let (status, body) = reply(d, &warm_text(100 + i)).await;
                db(d)
                    .execute_unprepared(&rename("inbound_receipts_away", "inbound_receipts"))
                    .await
                    .unwrap();
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            }
        }
        let first = d.metric(reads).await;
        let before = d.metric(reads).await;
        let (status, body) = reply(d, &warm_text(i)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let after = d.metric(reads).await;
        scrape = scrape.min(before - first);
        fewest = fewest.min(after - before);
    }
    fewest - scrape
}
