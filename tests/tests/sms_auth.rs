//! SMS authentication and consent through the real daemon: the 'Text Messages'
//! button, date-of-birth replies, the three-attempt rule, the two-week window (also
//! across downtime), keywords, STOP being absolute, and the errors of SPEC.md.
//! Inbound texts enter through the same entry point the gateway webhooks use.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use caremsg_entities::{DeliveryPurpose, delivery, message};
use caremsg_tests::{STAFF_TOKEN, TestDaemon, patient_body};
use caremsgd::gateways::inbound::EventOutcome;
use reqwest::{Method, StatusCode};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::{Value, json};

const PHONE: &str = "+12015550123";

async fn staff(
    d: &TestDaemon,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    d.call_as(method, path, Some(STAFF_TOKEN), Some("u1"), body.as_ref())
        .await
}

async fn start(d: &TestDaemon, patient: &str) -> (StatusCode, Value) {
    staff(
        d,
        Method::POST,
        &format!("/v1/staff/patients/{patient}/sms/start"),
        None,
    )
    .await
}

async fn sms_view(d: &TestDaemon, patient: &str) -> Value {
    let (status, view) = staff(
        d,
        Method::GET,
        &format!("/v1/staff/patients/{patient}/sms"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    view
}

/// A text from `from` to practice p1's number, as a gateway would hand it over.
async fn text(d: &TestDaemon, from: &str, body: &str) -> EventOutcome {
    d.text_to("p1", from, body).await
}

async fn texts_to(d: &TestDaemon, to: &str) -> Vec<delivery::Model> {
    delivery::Entity::find()
        .filter(delivery::Column::Recipient.eq(to))
        .filter(delivery::Column::Purpose.eq(DeliveryPurpose::SmsAuth))
        .order_by_asc(delivery::Column::CreatedAt)
        .order_by_asc(delivery::Column::Id)
        .all(&d.daemon().state().db)
        .await
        .unwrap()
}

async fn messages(d: &TestDaemon, patient: &str) -> Vec<message::Model> {
    d.messages_of(patient).await
}

/// Practice p1 (SMS on), user u1, patient pat1 (DOB 1950-04-07, mobile PHONE).
async fn clinic() -> TestDaemon {
    let d = TestDaemon::start().await.unwrap();
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    d.patient("p1", "pat1", &[], &["u1"]).await;
    d
}

fn assert_no_dob(texts: &[delivery::Model]) {
    for t in texts {
        let body = t.body.as_deref().unwrap_or_default();
        for dob in ["1950", "04/07", "4/7"] {
            assert!(
                !body.contains(dob),
                "a text echoes the date of birth: {body}"
            );
        }
    }
}

#[tokio::test]
async fn opt_in_confirm_and_converse() {
    let d = clinic().await;
    let (status, view) = start(&d, "pat1").await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(
        (
            view["status"].as_str(),
            view["attempts"].as_i64(),
            view["max_attempts"].as_i64()
        ),
        (Some("pending"), Some(0), Some(3))
    );
    let sent = texts_to(&d, PHONE).await;
    assert_eq!(sent.len(), 1);
    let opt_in = sent[0].body.clone().unwrap();
    assert!(
        opt_in.contains("Clinic p1"),
        "the opt-in text names the practice: {opt_in}"
    );
    assert_eq!(
        opt_in,
        caremsgd::sms::texts::opt_in(caremsgd::sms::texts::PracticeName::new("Clinic p1"))
    );

    // A correct reply, leniently written: enabled, one confirmation, not stored as a message.
    assert_eq!(
        text(&d, PHONE, " 4-7-1950. ").await,
        EventOutcome::Conversation
    );
    let view = sms_view(&d, "pat1").await;
    assert_eq!(view["status"], "enabled");
    let history: Vec<&str> = view["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["pending", "enabled"]);
    let sent = texts_to(&d, PHONE).await;
    assert_eq!(sent.len(), 2);
    assert_no_dob(&sent);
    let stored = messages(&d, "pat1").await;
    assert!(
        stored
            .iter()
            .all(|m| m.direction == caremsg_entities::Direction::System),
        "the DOB reply is no message"
    );
    assert_eq!(stored.len(), 2, "a system event per status change");

    // Now texts are conversation messages; a sentence with "stop" is flagged, not an opt-out.
    assert_eq!(
        text(&d, PHONE, "Running late, see you at 3").await,
        EventOutcome::Conversation
    );
    assert_eq!(
        text(&d, PHONE, "Please stop sending me reminders").await,
        EventOutcome::Conversation
    );
    let stored = messages(&d, "pat1").await;
    let last = stored.last().unwrap();
    assert_eq!(
        (last.direction, last.channel),
        (
            caremsg_entities::Direction::FromPatient,
            caremsg_entities::Channel::Sms
        )
    );
    assert!(last.possible_opt_out);
    assert!(!stored[stored.len() - 2].possible_opt_out);
    assert_eq!(sms_view(&d, "pat1").await["status"], "enabled");

    // Staff messages now go out by SMS too.
    let (status, sent) = staff(
        &d,
        Method::POST,
        "/v1/staff/patients/pat1/messages",
        Some(json!({"body": "See you then"})),
    )
    .await;
    assert_eq!(
        (status, sent["channel"].as_str()),
        (StatusCode::CREATED, Some("sms"))
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn status_changes_notify_two_way_texting_users() {
    let d = clinic().await;
    d.user("p1", "u2", &[]).await;
    let (status, _) = d
        .call_as(
            Method::PUT,
            "/v1/staff/settings/notifications",
            Some(STAFF_TOKEN),
            Some("u1"),
            Some(&json!({"two_way_texting": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    start(&d, "pat1").await;
    text(&d, PHONE, "04/07/1950").await;
    text(&d, PHONE, "STOP").await;
    let (status, list) = d
        .call_as(
            Method::GET,
            "/v1/staff/notifications",
            Some(STAFF_TOKEN),
            Some("u1"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let kinds: Vec<&str> = list["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["sms_status", "sms_status"],
        "enabled and opted out, not pending: {list}"
    );
    let (_, other) = d
        .call_as(
            Method::GET,
            "/v1/staff/notifications",
            Some(STAFF_TOKEN),
            Some("u2"),
            None,
        )
        .await;
    assert_eq!(
        other["notifications"],
        json!([]),
        "u2 has Two-Way Texting off and is not on the panel"
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn three_wrong_replies_fail_and_a_restart_keeps_the_count() {
    let mut d = clinic().await;
    start(&d, "pat1").await;
    text(&d, PHONE, "01/01/1990").await;
    text(&d, PHONE, "I don't remember").await;
    assert_eq!(sms_view(&d, "pat1").await["attempts"], 2);
    d.restart().await.unwrap();
    assert_eq!(
        sms_view(&d, "pat1").await["attempts"],
        2,
        "the count survives a restart"
    );
    text(&d, PHONE, "02/30/1950").await;
    let view = sms_view(&d, "pat1").await;
    assert_eq!(
        (
            view["status"].as_str(),
            view["reason"].as_str(),
            view["attempts"].as_i64()
        ),
        (Some("failed"), Some("wrong_dob_3x"), Some(3))
    );
    let sent = texts_to(&d, PHONE).await;
    assert_eq!(sent.len(), 4, "opt-in, two asks again, one failure text");
    assert_no_dob(&sent);
    // No fourth try: the number is no longer routed to the session.
    assert_eq!(text(&d, PHONE, "04/07/1950").await, EventOutcome::Unmatched);
    assert_eq!(sms_view(&d, "pat1").await["status"], "failed");
    // Starting again from failed is a fresh session.
    let (status, view) = start(&d, "pat1").await;
    assert_eq!(
        (status, view["status"].as_str(), view["attempts"].as_i64()),
        (StatusCode::OK, Some("pending"), Some(0))
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_two_week_window_counts_from_the_newest_opt_in_text_and_catches_up() {
    let mut d = clinic().await;
    start(&d, "pat1").await;
    d.clock.advance(chrono::Duration::days(13));
    d.daemon().tick_timers().await.unwrap();
    let (status, _) = staff(&d, Method::POST, "/v1/staff/patients/pat1/sms/resend", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(texts_to(&d, PHONE).await.len(), 2);
    assert_eq!(sms_view(&d, "pat1").await["attempts"], 0);
    d.clock.advance(chrono::Duration::days(2));
    d.daemon().tick_timers().await.unwrap();
    assert_eq!(
        sms_view(&d, "pat1").await["status"],
        "pending",
        "the resend moved the window"
    );

    // The daemon is down when the window ends; it fails the session once on start.
    d.clock
        .advance(chrono::Duration::days(12) + chrono::Duration::seconds(1));
    d.restart().await.unwrap();
    d.daemon().tick_timers().await.unwrap();
    let view = sms_view(&d, "pat1").await;
    assert_eq!(
        (view["status"].as_str(), view["reason"].as_str()),
        (Some("failed"), Some("expired"))
    );
    let failures = view["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["status"] == "failed")
        .count();
    assert_eq!(failures, 1, "failed exactly once");
    let (status, err) = staff(&d, Method::POST, "/v1/staff/patients/pat1/sms/resend", None).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_pending"))
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn stop_is_absolute_until_the_patient_texts_start() {
    let d = clinic().await;
    start(&d, "pat1").await;
    assert_eq!(text(&d, PHONE, "Stop.").await, EventOutcome::Conversation);
    let view = sms_view(&d, "pat1").await;
    assert_eq!(
        (view["status"].as_str(), view["reason"].as_str()),
        (Some("opted_out"), Some("patient_stop"))
    );
    let sent = texts_to(&d, PHONE).await;
    assert_eq!(sent.len(), 2, "the opt-in text and one confirmation");
    assert_eq!(sent[1].subject.as_deref(), Some("opt_out_confirmation"));

    // A repeated STOP, or HELP, from the opted-out number gets no answer.
    text(&d, PHONE, "STOP!").await;
    text(&d, PHONE, "help").await;
    assert_eq!(texts_to(&d, PHONE).await.len(), 2);
    // Staff cannot opt a patient back in; nor start anyone on that number.
    let (status, err) = start(&d, "pat1").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("patient_opted_out"))
    );
    let (status, _) = staff(
        &d,
        Method::POST,
        "/v1/staff/patients/pat1/messages",
        Some(json!({"body": "hello?"})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "portal still reaches the patient"
    );
    assert_eq!(texts_to(&d, PHONE).await.len(), 2);
    let staff_sms = delivery::Entity::find()
        .filter(delivery::Column::Recipient.eq(PHONE))
        .filter(delivery::Column::Purpose.eq(DeliveryPurpose::Message))
        .all(&d.daemon().state().db)
        .await
        .unwrap();
    assert!(
        staff_sms.is_empty(),
        "no staff message goes to an opted-out number"
    );
    let keyword_events = messages(&d, "pat1")
        .await
        .iter()
        .filter(|m| m.body.contains("opt-out keyword"))
        .count();
    assert_eq!(keyword_events, 2, "each keyword text is one system event");

    // START opts back in: a new pending session and the opt-in text.
    text(&d, PHONE, "START").await;
    let view = sms_view(&d, "pat1").await;
    assert_eq!(
        (view["status"].as_str(), view["attempts"].as_i64()),
        (Some("pending"), Some(0))
    );
    assert_eq!(texts_to(&d, PHONE).await.len(), 3);
    text(&d, PHONE, "04/07/1950").await;
    assert_eq!(sms_view(&d, "pat1").await["status"], "enabled");

    // A staff opt-out sends nothing and staff may start again.
    let (status, view) = staff(
        &d,
        Method::POST,
        "/v1/staff/patients/pat1/sms/opt-out",
        None,
    )
    .await;
    assert_eq!(
        (status, view["reason"].as_str()),
        (StatusCode::OK, Some("staff_opt_out"))
    );
    let count = texts_to(&d, PHONE).await.len();
    let (status, view) = start(&d, "pat1").await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::OK, Some("pending"))
    );
    assert_eq!(texts_to(&d, PHONE).await.len(), count + 1);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn refusals_name_the_problem_and_change_nothing() {
    let d = clinic().await;
    // Invalid number in the modal: 422, and the stored number is unchanged.
    let (status, err) = staff(
        &d,
        Method::POST,
        "/v1/staff/patients/pat1/sms/start",
        Some(json!({"mobile_phone": "555"})),
    )
    .await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("mobile_phone"))
    );
    let (status, err) = staff(
        &d,
        Method::POST,
        "/v1/staff/patients/pat1/sms/start",
        Some(json!({"mobile_phone": "1-800-555-0199"})),
    )
    .await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("mobile_phone"))
    );
    assert_eq!(sms_view(&d, "pat1").await["status"], "none");

    // One number, one patient: 409 naming no one; nothing changes for the second.
    let mut body = patient_body("p1", &[], &["u1"]);
    body["first_name"] = json!("Second");
    body["mobile_phone"] = json!(null);
    d.admin_put("/v1/admin/patients/pat2", body).await;
    start(&d, "pat1").await;
    let (status, err) = staff(
        &d,
        Method::POST,
        "/v1/staff/patients/pat2/sms/start",
        Some(json!({"mobile_phone": PHONE})),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("phone_in_use"))
    );
    assert!(
        !err.to_string().contains("pat1") && !err.to_string().contains("Pat"),
        "names no other patient: {err}"
    );
    let pat2 = caremsg_entities::patient::Entity::find_by_id("pat2")
        .one(&d.daemon().state().db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pat2.mobile_phone, None, "a refused start changes no number");
    // No mobile number at all.
    let (status, err) = start(&d, "pat2").await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("mobile_phone"))
    );

    // A number that texted STOP to the practice cannot be started.
    assert_eq!(
        text(&d, "+12015550177", "STOP").await,
        EventOutcome::Unmatched
    );
    let (status, err) = staff(
        &d,
        Method::POST,
        "/v1/staff/patients/pat2/sms/start",
        Some(json!({"mobile_phone": "+12015550177"})),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("number_opted_out"))
    );

    // Resend when not pending; a practice without SMS.
    let (status, err) = staff(&d, Method::POST, "/v1/staff/patients/pat2/sms/resend", None).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_pending"))
    );
    let mut practice = caremsg_tests::practice_body("p1");
    practice["sms_enabled"] = json!(false);
    d.admin_put("/v1/admin/practices/p1", practice).await;
    for action in ["start", "resend", "opt-out"] {
        let (status, err) = staff(
            &d,
            Method::POST,
            &format!("/v1/staff/patients/pat1/sms/{action}"),
            None,
        )
        .await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("sms_disabled")),
            "{action}"
        );
    }
    d.stop().await.unwrap();
}

#[tokio::test]
async fn unmatched_numbers_get_only_stop_and_help_answers() {
    let d = clinic().await;
    let stranger = "+12015550166";
    assert_eq!(text(&d, stranger, "hello?").await, EventOutcome::Unmatched);
    assert!(
        texts_to(&d, stranger).await.is_empty(),
        "nothing else is answered"
    );
    text(&d, stranger, "Info").await;
    assert_eq!(
        texts_to(&d, stranger).await.len(),
        1,
        "HELP gets the help text"
    );
    text(&d, stranger, "unsubscribe").await;
    text(&d, stranger, "STOP").await;
    text(&d, stranger, "HELP").await;
    let sent = texts_to(&d, stranger).await;
    assert_eq!(sent.len(), 2, "STOP confirmed once; nothing after it");
    assert_eq!(sent[1].subject.as_deref(), Some("opt_out_confirmation"));
    let log = caremsg_entities::unmatched_inbound::Entity::find()
        .all(&d.daemon().state().db)
        .await
        .unwrap();
    assert_eq!(log.len(), 5, "every text is kept for operators");
    // START restores the number's consent.
    text(&d, stranger, "start").await;
    text(&d, stranger, "help").await;
    assert_eq!(texts_to(&d, stranger).await.len(), 3);
    d.stop().await.unwrap();
}
