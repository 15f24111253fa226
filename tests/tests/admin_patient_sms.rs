//! The admin patient upsert and the SMS state it does not own: a `PUT` never writes
//! back the SMS status it read (the conversation actor's change committed between its
//! read and its write stays), and a `PUT` that changes or removes the mobile number
//! turns text messaging off in the same commit — a `system` message, the pending
//! session ended with its timer, nothing texted to either number.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use caremsg_entities::{DeliveryStatus, Direction, delivery, message, practice_sms_number};
use caremsg_tests::{STAFF_TOKEN, TestDaemon, patient_body};
use caremsgd::gateways::inbound::{EventOutcome, InboundSms, route};
use caremsgd::phi::Phi;
use reqwest::{Method, StatusCode};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};

/// pat1's number as the platform first sends it ("(201) 555-0123").
const PHONE: &str = "+12015550123";
/// The number the platform changes it to.
const NEW_PHONE: &str = "+12015550177";
/// What the conversation says when a new number turns texting off.
const NUMBER_CHANGED: &str = "Text messaging turned off: the mobile number changed; start text messaging again to confirm the new number.";

async fn staff(
    d: &TestDaemon,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    d.call_as(method, path, Some(STAFF_TOKEN), Some("u1"), body.as_ref())
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

fn status_of(view: &Value) -> (Option<&str>, Option<&str>) {
    (view["status"].as_str(), view["reason"].as_str())
}

/// A text from `from` to practice p1's number, as a gateway would hand it over.
async fn text(d: &TestDaemon, from: &str, body: &str) -> EventOutcome {
    d.text_to("p1", from, body).await
}

async fn deliveries_to(d: &TestDaemon, to: &str) -> u64 {
    delivery::Entity::find()
        .filter(delivery::Column::Recipient.eq(to))
        .count(&d.daemon().state().db)
        .await
        .unwrap()
}

async fn messages(d: &TestDaemon, patient: &str) -> Vec<message::Model> {
    d.messages_of(patient).await
}

/// pat1's admin body with `mobile_phone` set to `phone` (`None`: left out).
fn pat1_with(phone: Option<&str>) -> Value {
    let mut body = patient_body("p1", &[], &["u1"]);
    match phone {
        Some(phone) => body["mobile_phone"] = json!(phone),
        None => {
            body.as_object_mut().unwrap().remove("mobile_phone");
        }
    }
    body
}

async fn put_pat1(d: &TestDaemon, body: Value) -> Value {
    let (status, out) = d.admin_put("/v1/admin/patients/pat1", body).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    out
}

/// Practice p1 (SMS on), user u1, patient pat1 (DOB 1950-04-07, mobile PHONE,
/// portal-enrolled).
async fn clinic_with(edit: impl FnOnce(String) -> String) -> TestDaemon {
    let d = TestDaemon::start_with(edit).await.unwrap();
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    d.patient("p1", "pat1", &[], &["u1"]).await;
    d
}

async fn clinic() -> TestDaemon {
    clinic_with(|text| text).await
}

async fn start_sms(d: &TestDaemon) {
    let (status, view) = staff(d, Method::POST, "/v1/staff/patients/pat1/sms/start", None).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["status"], "pending");
}

/// pat1 enabled on PHONE (the opt-in text and the confirmation sent).
async fn enable(d: &TestDaemon) {
    start_sms(d).await;
    assert_eq!(
        text(d, PHONE, "04/07/1950").await,
        EventOutcome::Conversation
    );
    assert_eq!(sms_view(d, "pat1").await["status"], "enabled");
}

/// Waits until the gateway dispatchers have handed every queued text to the loopback
/// plugin, so that none of their writes joins a race set up after it.
async fn settle(d: &TestDaemon) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let busy = delivery::Entity::find()
            .filter(
                delivery::Column::Status.is_in([DeliveryStatus::Queued, DeliveryStatus::Sending]),
            )
            .count(&d.daemon().state().db)
            .await
            .unwrap();
        if busy == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dispatchers did not send the queued texts"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Runs `change` (an SMS transition of pat1's actor) and an admin re-PUT of pat1's
/// unchanged data so that the PUT reads the patient before `change` commits and
/// writes after it: one unit per batch, the writer paused until both are queued,
/// `change` first.
async fn race_with_put<F>(d: &TestDaemon, change: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    settle(d).await;
    let writer = d.daemon().state().writer.clone();
    writer.pause();
    let change = tokio::spawn(change);
    while writer.queued() < 1 {
        tokio::task::yield_now().await;
    }
    let http = d.http.clone();
    let url = format!("{}/v1/admin/patients/pat1", d.base);
    let put = tokio::spawn(async move {
        http.put(url)
            .bearer_auth(caremsg_tests::ADMIN_TOKEN)
            .json(&pat1_with(Some("(201) 555-0123")))
            .send()
            .await
            .unwrap()
            .status()
    });
    while writer.queued() < 2 {
        tokio::task::yield_now().await;
    }
    writer.resume();
    change.await.unwrap();
    assert_eq!(put.await.unwrap(), StatusCode::OK);
}

/// One unit per batch, so that the race's two units commit in the order queued.
fn one_unit_per_batch(text: String) -> String {
    format!("{text}\n[writer]\nmax_batch_units = 1\n")
}

#[tokio::test]
async fn a_put_does_not_undo_a_staff_opt_out_committed_after_its_read() {
    let d = clinic_with(one_unit_per_batch).await;
    enable(&d).await;
    let (http, base) = (d.http.clone(), d.base.clone());
    race_with_put(&d, async move {
        let status = http
            .post(format!("{base}/v1/staff/patients/pat1/sms/opt-out"))
            .bearer_auth(STAFF_TOKEN)
            .header("X-Caremsg-User", "u1")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::OK);
    })
    .await;
    assert_eq!(
        status_of(&sms_view(&d, "pat1").await),
        (Some("opted_out"), Some("staff_opt_out"))
    );
    // Nothing goes out by SMS any more.
    let (status, sent) = staff(
        &d,
        Method::POST,
        "/v1/staff/patients/pat1/messages",
        Some(json!({"body": "Are you there?"})),
    )
    .await;
    assert_eq!(
        (status, sent["channel"].as_str()),
        (StatusCode::CREATED, Some("portal")),
        "{sent}"
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_put_does_not_undo_a_stop_committed_after_its_read() {
    let d = clinic_with(one_unit_per_batch).await;
    enable(&d).await;
    let state = d.daemon().state().clone();
    race_with_put(&d, async move {
        let to = practice_sms_number::Entity::find()
            .filter(practice_sms_number::Column::PracticeId.eq("p1"))
            .one(&state.db)
            .await
            .unwrap()
            .unwrap()
            .number;
        let sms = InboundSms {
            gateway: "loopback".into(),
            provider_message_id: "race-stop".into(),
            from: Phi::new(PHONE.to_owned()),
            to: Phi::new(to),
            body: Phi::new("STOP".to_owned()),
        };
        route(&state, sms).await.unwrap();
    })
    .await;
    assert_eq!(
        status_of(&sms_view(&d, "pat1").await),
        (Some("opted_out"), Some("patient_stop"))
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_put_does_not_undo_a_confirmation_committed_after_its_read() {
    let d = clinic_with(one_unit_per_batch).await;
    start_sms(&d).await;
    let state = d.daemon().state().clone();
    race_with_put(&d, async move {
        let to = practice_sms_number::Entity::find()
            .filter(practice_sms_number::Column::PracticeId.eq("p1"))
            .one(&state.db)
            .await
            .unwrap()
            .unwrap()
            .number;
        let sms = InboundSms {
            gateway: "loopback".into(),
            provider_message_id: "race-dob".into(),
            from: Phi::new(PHONE.to_owned()),
            to: Phi::new(to),
            body: Phi::new("04/07/1950".to_owned()),
        };
        route(&state, sms).await.unwrap();
    })
    .await;
    assert_eq!(
        status_of(&sms_view(&d, "pat1").await),
        (Some("enabled"), None)
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_new_number_turns_texting_off_and_texts_neither_number() {
    let d = clinic().await;
    enable(&d).await;
    let before = messages(&d, "pat1").await.len();
    let texts_before = deliveries_to(&d, PHONE).await;

    let out = put_pat1(&d, pat1_with(Some("201-555-0177"))).await;
    assert_eq!(
        (out["mobile_phone"].as_str(), out["sms_status"].as_str()),
        (Some(NEW_PHONE), Some("none"))
    );
    let view = sms_view(&d, "pat1").await;
    assert_eq!(status_of(&view), (Some("none"), Some("number_changed")));
    assert_eq!(
        view["history"].as_array().unwrap().last().unwrap()["status"],
        "none"
    );
    let stored = messages(&d, "pat1").await;
    assert_eq!(stored.len(), before + 1, "one system message");
    let last = stored.last().unwrap();
    assert_eq!(
        (last.direction, last.body.as_str()),
        (Direction::System, NUMBER_CHANGED)
    );

    // A staff message goes to the portal only; nothing is texted to either number.
    let (status, sent) = staff(
        &d,
        Method::POST,
        "/v1/staff/patients/pat1/messages",
        Some(json!({"body": "Your results are in"})),
    )
    .await;
    assert_eq!(
        (status, sent["channel"].as_str()),
        (StatusCode::CREATED, Some("portal")),
        "{sent}"
    );
    let channels: Vec<&str> = sent["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["channel"].as_str().unwrap())
        .collect();
    assert!(!channels.contains(&"sms"), "{sent}");
    assert_eq!(deliveries_to(&d, PHONE).await, texts_before);
    assert_eq!(deliveries_to(&d, NEW_PHONE).await, 0);

    // The old number's texts no longer reach the conversation.
    assert_eq!(text(&d, PHONE, "hello?").await, EventOutcome::Unmatched);
    assert_eq!(messages(&d, "pat1").await.len(), before + 2);

    // Texting on the new number starts over: a fresh session, the opt-in text to it.
    start_sms(&d).await;
    assert_eq!(deliveries_to(&d, NEW_PHONE).await, 1);
    d.stop().await.unwrap();
}

/// A text to PHONE queued for pat1, due tomorrow (the dispatchers leave it alone).
fn queued_text(d: &TestDaemon, id: &str, subject: Option<&str>) -> delivery::ActiveModel {
    use caremsg_entities::{DeliveryChannel, DeliveryPurpose};
    let now = caremsgd::clock::Clock::now(&d.clock);
    delivery::ActiveModel::from(delivery::Model {
        id: id.into(),
        message_id: None,
        notification_id: None,
        patient_id: Some("pat1".into()),
        practice_id: "p1".into(),
        channel: DeliveryChannel::Sms,
        purpose: DeliveryPurpose::SmsAuth,
        gateway: Some("loopback".into()),
        recipient: Some(PHONE.into()),
        from_number: None,
        subject: subject.map(str::to_owned),
        body: Some("queued".into()),
        status: DeliveryStatus::Queued,
        attempts: 0,
        next_attempt_at: now + chrono::Duration::days(1),
        claimed_at: None,
        provider_message_id: None,
        error_code: None,
        error_reason: None,
        created_at: now,
        updated_at: now,
    })
}

#[tokio::test]
async fn a_new_number_refuses_the_texts_still_queued_for_the_old_one() {
    let d = clinic().await;
    enable(&d).await;
    let db = &d.daemon().state().db;
    delivery::Entity::insert_many([
        queued_text(&d, "queued-text", None),
        queued_text(
            &d,
            "queued-confirmation",
            Some(caremsgd::sms::auth::OPT_OUT_CONFIRMATION_SUBJECT),
        ),
    ])
    .exec(db)
    .await
    .unwrap();
    put_pat1(&d, pat1_with(Some(NEW_PHONE))).await;
    let status = |id: &'static str| async move {
        let row = delivery::Entity::find_by_id(id)
            .one(db)
            .await
            .unwrap()
            .unwrap();
        (row.status, row.error_code)
    };
    assert_eq!(
        status("queued-text").await,
        (DeliveryStatus::Refused, Some("number_changed".into()))
    );
    // The one confirmation of a STOP is owed to the number that sent it.
    assert_eq!(
        status("queued-confirmation").await,
        (DeliveryStatus::Queued, None)
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_new_number_ends_a_pending_session_for_good() {
    let d = clinic().await;
    start_sms(&d).await;
    put_pat1(&d, pat1_with(Some(NEW_PHONE))).await;
    let view = sms_view(&d, "pat1").await;
    assert_eq!(status_of(&view), (Some("none"), Some("number_changed")));
    assert_eq!(view["expires_at"], Value::Null, "{view}");
    let after_change = messages(&d, "pat1").await.len();

    // The date of birth from the old number enables nothing.
    assert_eq!(text(&d, PHONE, "04/07/1950").await, EventOutcome::Unmatched);
    assert_eq!(status_of(&sms_view(&d, "pat1").await).0, Some("none"));

    // The old session's window passes: its timer does not act.
    d.clock.advance(chrono::Duration::days(15));
    d.daemon().tick_timers().await.unwrap();
    let view = sms_view(&d, "pat1").await;
    assert_eq!(status_of(&view), (Some("none"), Some("number_changed")));
    assert_eq!(messages(&d, "pat1").await.len(), after_change);
    assert_eq!(deliveries_to(&d, PHONE).await, 1, "only the opt-in text");
    assert_eq!(deliveries_to(&d, NEW_PHONE).await, 0);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn removing_the_number_turns_texting_off() {
    let d = clinic().await;
    enable(&d).await;
    let before = messages(&d, "pat1").await.len();
    let out = put_pat1(&d, pat1_with(None)).await;
    assert_eq!(
        (out["mobile_phone"].clone(), out["sms_status"].as_str()),
        (Value::Null, Some("none"))
    );
    assert_eq!(
        status_of(&sms_view(&d, "pat1").await),
        (Some("none"), Some("number_changed"))
    );
    let stored = messages(&d, "pat1").await;
    assert_eq!(stored.len(), before + 1);
    assert_eq!(stored.last().unwrap().direction, Direction::System);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_same_number_in_another_format_changes_nothing() {
    let d = clinic().await;
    enable(&d).await;
    let before = messages(&d, "pat1").await.len();
    for same in ["+1 201 555 0123", "2015550123", "(201) 555-0123"] {
        let out = put_pat1(&d, pat1_with(Some(same))).await;
        assert_eq!(
            (out["mobile_phone"].as_str(), out["sms_status"].as_str()),
            (Some(PHONE), Some("enabled"))
        );
    }
    assert_eq!(
        status_of(&sms_view(&d, "pat1").await),
        (Some("enabled"), None)
    );
    assert_eq!(messages(&d, "pat1").await.len(), before);

    // A brand-new patient starts with nothing.
    let (status, out) = d
        .admin_put(
            "/v1/admin/patients/pat2",
            json!({
                "practice_id": "p1", "first_name": "New", "last_name": "Patient",
                "date_of_birth": "1960-01-02", "mobile_phone": "201-555-0199",
                "portal_enrolled": true, "care_team": ["u1"],
            }),
        )
        .await;
    assert_eq!(
        (status, out["sms_status"].as_str()),
        (StatusCode::OK, Some("none"))
    );
    assert!(messages(&d, "pat2").await.is_empty());
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_new_number_clears_the_old_numbers_opt_out_but_not_staffs() {
    // The patient's STOP belongs to the old number: the new one can be started.
    let d = clinic().await;
    enable(&d).await;
    text(&d, PHONE, "STOP").await;
    assert_eq!(
        status_of(&sms_view(&d, "pat1").await),
        (Some("opted_out"), Some("patient_stop"))
    );
    let before = messages(&d, "pat1").await.len();
    put_pat1(&d, pat1_with(Some(NEW_PHONE))).await;
    assert_eq!(
        status_of(&sms_view(&d, "pat1").await),
        (Some("none"), Some("number_changed"))
    );
    assert_eq!(messages(&d, "pat1").await.len(), before + 1);
    start_sms(&d).await;
    // The old number stays opted out: a START from it restores only its own consent.
    let texts_before = deliveries_to(&d, PHONE).await;
    assert_eq!(text(&d, PHONE, "START").await, EventOutcome::Unmatched);
    assert_eq!(deliveries_to(&d, PHONE).await, texts_before);
    d.stop().await.unwrap();

    // A staff opt-out is about the patient: it stays, and nothing is added.
    let d = clinic().await;
    enable(&d).await;
    let (status, _) = staff(
        &d,
        Method::POST,
        "/v1/staff/patients/pat1/sms/opt-out",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let before = messages(&d, "pat1").await.len();
    let out = put_pat1(&d, pat1_with(Some(NEW_PHONE))).await;
    assert_eq!(out["sms_status"], "opted_out");
    assert_eq!(
        status_of(&sms_view(&d, "pat1").await),
        (Some("opted_out"), Some("staff_opt_out"))
    );
    assert_eq!(messages(&d, "pat1").await.len(), before);
    d.stop().await.unwrap();
}
