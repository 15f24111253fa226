//! Notifications through the real daemon, with the injected clock: who is notified of a
//! patient's portal message or text (and that staff messages notify no one), the
//! notification list and the live `notification` event, the Unread Message Reminder
//! (24 hours, viewing cancels it, one per streak, once across a restart), the
//! settings' rules, and the Two-Way Texting recipients.
//!
//! Timers are driven with `Running::tick_timers` after moving the clock: when it
//! returns, every reminder due at that instant has fired.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::collections::BTreeSet;

use caremsg_entities::{
    NotificationKind, SmsStatus, TimerKind, message, notification, patient, timer,
};
use caremsg_tests::{PORTAL_TOKEN, STAFF_TOKEN, TestDaemon, practice_body};
use caremsgd::clock::Clock;
use caremsgd::notifications::{SmsStatusChange, on_sms_status};
use chrono::Duration;
use reqwest::{Method, StatusCode};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder};
use serde_json::{Value, json};

fn db(d: &TestDaemon) -> &DatabaseConnection {
    &d.daemon().state().db
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

async fn portal_send(d: &TestDaemon, patient: &str, body: &str) -> Value {
    let (status, out) = d
        .call(
            Method::POST,
            &format!("/v1/portal/patients/{patient}/messages"),
            Some(PORTAL_TOKEN),
            Some(&json!({"body": body})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{out}");
    out
}

async fn settings(d: &TestDaemon, user: &str, change: Value) -> (StatusCode, Value) {
    staff(
        d,
        Method::PUT,
        user,
        "/v1/staff/settings/notifications",
        Some(change),
    )
    .await
}

async fn set(d: &TestDaemon, user: &str, change: Value) {
    let (status, body) = settings(d, user, change).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Every stored notification of `kind`, oldest first.
async fn stored(d: &TestDaemon, kind: NotificationKind) -> Vec<notification::Model> {
    notification::Entity::find()
        .filter(notification::Column::Kind.eq(kind))
        .order_by_asc(notification::Column::CreatedAt)
        .order_by_asc(notification::Column::UserId)
        .all(db(d))
        .await
        .unwrap()
}

fn users(rows: &[notification::Model]) -> BTreeSet<String> {
    rows.iter().map(|n| n.user_id.clone()).collect()
}

fn set_of(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

async fn reminder_timers(d: &TestDaemon) -> Vec<timer::Model> {
    timer::Entity::find()
        .filter(timer::Column::Kind.eq(TimerKind::UnreadReminder))
        .order_by_asc(timer::Column::Subject)
        .all(db(d))
        .await
        .unwrap()
}

async fn tick(d: &TestDaemon) {
    d.daemon().tick_timers().await.unwrap();
}

/// Practice p1 with program ccm and patient pat1 (in ccm). Care team: `member`
/// (default settings: notified), `off` (New Patient Message off), `restricted`
/// (restricted from ccm), `gone` (deleted). `watcher` chose "notify me"; `outsider`
/// is in no panel.
async fn clinic() -> TestDaemon {
    let d = TestDaemon::start().await.unwrap();
    d.practice("p1").await;
    d.program("p1", "ccm").await;
    for user in ["member", "off", "watcher", "outsider", "gone"] {
        d.user("p1", user, &[]).await;
    }
    d.user("p1", "restricted", &["ccm"]).await;
    d.patient(
        "p1",
        "pat1",
        &["ccm"],
        &["member", "off", "restricted", "gone"],
    )
    .await;
    let (status, body) = staff(
        &d,
        Method::PUT,
        "watcher",
        "/v1/staff/patients/pat1/notify",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    set(&d, "off", json!({"new_patient_message": false})).await;
    let (status, body) = d
        .call(
            Method::DELETE,
            "/v1/admin/users/gone",
            Some(caremsg_tests::ADMIN_TOKEN),
            None,
        )
        .await;
    assert!(status.is_success(), "{status} {body}");
    d
}

/// The users the Care Team panel shows as notified.
async fn panel_notified(d: &TestDaemon) -> BTreeSet<String> {
    let (status, panel) = staff(
        d,
        Method::GET,
        "member",
        "/v1/staff/patients/pat1/care-team",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{panel}");
    panel
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["notified"] == json!(true))
        .map(|e| e["user_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_portal_message_notifies_exactly_the_notified_panel_and_staff_messages_no_one() {
    let d = clinic().await;
    let message = portal_send(&d, "pat1", "Can I take it with food?").await;
    let rows = stored(&d, NotificationKind::NewPatientMessage).await;
    assert_eq!(users(&rows), set_of(&["member", "watcher"]));
    assert_eq!(
        users(&rows),
        panel_notified(&d).await,
        "the panel says who is notified"
    );
    let message_id = message::Entity::find()
        .filter(message::Column::PatientId.eq("pat1"))
        .one(db(&d))
        .await
        .unwrap()
        .unwrap()
        .id;
    for row in &rows {
        assert_eq!(row.patient_id, "pat1");
        assert_eq!(row.message_seq, Some(1));
        assert_eq!(row.subject, message_id);
        assert_eq!(row.read_at, None);
    }
    assert_eq!(message["seq"], 1);
    let in_app = r#"caremsg_notifications_total{kind="new_patient_message",channel="in_app"}"#;
    assert_eq!(d.metric(in_app).await, 2.0);

    let (status, list) = staff(&d, Method::GET, "member", "/v1/staff/notifications", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["unread"], 1);
    let n = &list["notifications"][0];
    assert_eq!(
        (
            n["kind"].as_str(),
            n["patient_id"].as_str(),
            n["message_seq"].as_i64(),
            n["read_at"].is_null()
        ),
        (Some("new_patient_message"), Some("pat1"), Some(1), true)
    );
    for nobody in ["off", "restricted", "outsider"] {
        let (_, list) = staff(&d, Method::GET, nobody, "/v1/staff/notifications", None).await;
        assert_eq!(list["notifications"], json!([]), "{nobody}");
    }

    // Staff messages notify no one, not even other care team members.
    let (status, body) = staff(
        &d,
        Method::POST,
        "member",
        "/v1/staff/patients/pat1/messages",
        Some(json!({"body": "Yes, with food."})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        notification::Entity::find()
            .all(db(&d))
            .await
            .unwrap()
            .len(),
        2
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_patient_text_notifies_exactly_the_notified_panel_once() {
    let d = clinic().await;
    patient::Entity::update_many()
        .col_expr(patient::Column::SmsStatus, Expr::value(SmsStatus::Enabled))
        .filter(patient::Column::Id.eq("pat1"))
        .exec(db(&d))
        .await
        .unwrap();
    let to = practice_body("p1")["sms_numbers"][0]["number"].clone();
    let reply =
        json!({"from": "+12015550123", "to": to, "body": "Running late today", "id": "sms-1"});
    // The provider retries: the text and its notifications are stored once.
    for _ in 0..2 {
        let response = d
            .http
            .post(format!("{}/v1/hooks/loopback", d.base))
            .json(&reply)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let rows = stored(&d, NotificationKind::NewPatientMessage).await;
    assert_eq!(users(&rows), set_of(&["member", "watcher"]), "{rows:?}");
    assert!(rows.iter().all(|n| n.message_seq == Some(1)));
    d.stop().await.unwrap();
}

#[tokio::test]
async fn notifications_are_listed_newest_first_in_pages_and_marked_read_by_their_user_only() {
    let d = clinic().await;
    for text in ["one", "two", "three"] {
        portal_send(&d, "pat1", text).await;
        d.clock.advance(Duration::minutes(1));
    }
    let (_, first) = staff(
        &d,
        Method::GET,
        "member",
        "/v1/staff/notifications?limit=2",
        None,
    )
    .await;
    let seqs: Vec<i64> = first["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["message_seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [3, 2]);
    assert_eq!(first["unread"], 3);
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = staff(
        &d,
        Method::GET,
        "member",
        &format!("/v1/staff/notifications?limit=2&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(second["notifications"][0]["message_seq"], 1);
    assert_eq!(second["next_cursor"], Value::Null);
    let (status, _) = staff(
        &d,
        Method::GET,
        "member",
        "/v1/staff/notifications?cursor=zz",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let id = first["notifications"][0]["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/staff/notifications/{id}/read");
    let (status, body) = staff(&d, Method::POST, "watcher", &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another user's: {body}");
    let (status, read) = staff(&d, Method::POST, "member", &path, None).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["read_at"], json!(d.clock.now()));
    d.clock.advance(Duration::minutes(5));
    let (_, again) = staff(&d, Method::POST, "member", &path, None).await;
    assert_eq!(again["read_at"], read["read_at"], "the first read stays");
    let (_, list) = staff(&d, Method::GET, "member", "/v1/staff/notifications", None).await;
    assert_eq!(list["unread"], 2);
    let (status, _) = staff(
        &d,
        Method::POST,
        "member",
        "/v1/staff/notifications/nope/read",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Losing access to the patient hides its notifications.
    d.user("p1", "member", &["ccm"]).await;
    let (_, list) = staff(&d, Method::GET, "member", "/v1/staff/notifications", None).await;
    assert_eq!(
        (list["notifications"].clone(), list["unread"].clone()),
        (json!([]), json!(0))
    );
    d.stop().await.unwrap();
}

/// Reads server-sent events from `response` until one named `name` arrives; returns
/// it and the names of the events passed over.
async fn next_event(
    response: &mut reqwest::Response,
    buffer: &mut String,
    name: &str,
) -> (Value, Vec<String>) {
    let mut passed = Vec::new();
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let event = block
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("")
                .to_owned();
            let data = block
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("");
            if event == name {
                return (serde_json::from_str(data).unwrap(), passed);
            }
            if !event.is_empty() {
                passed.push(event);
            }
            continue;
        }
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), response.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream stays open");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
}

async fn stream(d: &TestDaemon, user: &str) -> reqwest::Response {
    let response = d
        .http
        .get(format!("{}/v1/staff/events", d.base))
        .bearer_auth(STAFF_TOKEN)
        .header("X-Caremsg-User", user)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response
}

#[tokio::test]
async fn notifications_are_pushed_live_to_their_user_only() {
    let d = clinic().await;
    let mut member = stream(&d, "member").await;
    // `off` is on the care team: it sees the messages, never a notification.
    let mut off = stream(&d, "off").await;
    portal_send(&d, "pat1", "first").await;
    let mut buffer = String::new();
    let (event, _) = next_event(&mut member, &mut buffer, "notification").await;
    let (_, list) = staff(&d, Method::GET, "member", "/v1/staff/notifications", None).await;
    assert_eq!(event, list["notifications"][0]);
    assert_eq!(event["kind"], "new_patient_message");
    // Events are published in order: a notification for `off` from the first message
    // would come before the second message.
    portal_send(&d, "pat1", "second").await;
    let mut buffer = String::new();
    let (first, _) = next_event(&mut off, &mut buffer, "message").await;
    assert_eq!(first["seq"], 1);
    let (second, passed) = next_event(&mut off, &mut buffer, "message").await;
    assert_eq!(second["seq"], 2);
    assert!(!passed.contains(&"notification".to_owned()), "{passed:?}");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_reminder_comes_at_24_hours_once_and_only_while_wanted() {
    let d = clinic().await;
    set(&d, "member", json!({"unread_reminder": true})).await;
    // watcher asks for it and turns it off again before it is due.
    set(&d, "watcher", json!({"unread_reminder": true})).await;
    let start = d.clock.now();
    portal_send(&d, "pat1", "Is my appointment still on?").await;
    set(&d, "watcher", json!({"unread_reminder": false})).await;
    let timers = reminder_timers(&d).await;
    assert_eq!(
        timers
            .iter()
            .map(|t| t.subject.as_str())
            .collect::<Vec<_>>(),
        ["pat1/member/1", "pat1/watcher/1"]
    );
    assert!(
        timers
            .iter()
            .all(|t| t.due_at == start + Duration::hours(24))
    );

    d.clock
        .set(start + Duration::hours(24) - Duration::milliseconds(1));
    tick(&d).await;
    assert_eq!(stored(&d, NotificationKind::UnreadReminder).await, []);
    d.clock.set(start + Duration::hours(24));
    tick(&d).await;
    let reminders = stored(&d, NotificationKind::UnreadReminder).await;
    assert_eq!(users(&reminders), set_of(&["member"]));
    assert_eq!(reminders[0].subject, "pat1/member/1");
    assert_eq!(reminders[0].message_seq, Some(1));
    assert!(reminder_timers(&d).await.iter().all(|t| t.fired));
    d.clock.advance(Duration::hours(30));
    tick(&d).await;
    assert_eq!(stored(&d, NotificationKind::UnreadReminder).await.len(), 1);
    let in_app = r#"caremsg_notifications_total{kind="unread_reminder",channel="in_app"}"#;
    assert_eq!(d.metric(in_app).await, 1.0);
    let (_, list) = staff(&d, Method::GET, "member", "/v1/staff/notifications", None).await;
    assert_eq!(list["notifications"][0]["kind"], "unread_reminder");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn viewing_at_23_hours_cancels_the_reminder_and_the_next_message_starts_a_new_streak() {
    let d = clinic().await;
    set(&d, "member", json!({"unread_reminder": true})).await;
    let start = d.clock.now();
    portal_send(&d, "pat1", "Question about my dose").await;
    d.clock.set(start + Duration::hours(23));
    let (status, body) = staff(
        &d,
        Method::GET,
        "member",
        "/v1/staff/patients/pat1/conversation",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(reminder_timers(&d).await, []);
    d.clock.set(start + Duration::hours(48));
    tick(&d).await;
    assert_eq!(stored(&d, NotificationKind::UnreadReminder).await, []);

    // A reply by the user also counts as viewing (the firing checks the read marker).
    portal_send(&d, "pat1", "Another question").await;
    let (status, body) = staff(
        &d,
        Method::POST,
        "member",
        "/v1/staff/patients/pat1/messages",
        Some(json!({"body": "Answered on the phone."})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    d.clock.advance(Duration::hours(25));
    tick(&d).await;
    assert_eq!(stored(&d, NotificationKind::UnreadReminder).await, []);

    // The next patient message starts a new streak, reminded in its own right.
    let again = d.clock.now();
    portal_send(&d, "pat1", "Third question").await;
    assert!(
        reminder_timers(&d)
            .await
            .iter()
            .any(|t| t.subject == "pat1/member/4" && !t.fired)
    );
    d.clock.set(again + Duration::hours(24));
    tick(&d).await;
    let reminders = stored(&d, NotificationKind::UnreadReminder).await;
    assert_eq!(reminders.len(), 1);
    assert_eq!(
        (reminders[0].subject.as_str(), reminders[0].message_seq),
        ("pat1/member/4", Some(4))
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn five_patient_messages_in_an_hour_give_one_reminder_per_user() {
    let d = clinic().await;
    set(&d, "member", json!({"unread_reminder": true})).await;
    set(&d, "watcher", json!({"unread_reminder": true})).await;
    let start = d.clock.now();
    for i in 0..5 {
        d.clock.set(start + Duration::minutes(15 * i));
        portal_send(&d, "pat1", &format!("message {i}")).await;
    }
    let timers = reminder_timers(&d).await;
    assert_eq!(
        timers
            .iter()
            .map(|t| (t.subject.as_str(), t.due_at))
            .collect::<Vec<_>>(),
        [
            ("pat1/member/1", start + Duration::hours(24)),
            ("pat1/watcher/1", start + Duration::hours(24))
        ],
        "one timer per user, from the oldest unviewed message"
    );
    d.clock.set(start + Duration::hours(24));
    tick(&d).await;
    d.clock.set(start + Duration::hours(26));
    tick(&d).await;
    let reminders = stored(&d, NotificationKind::UnreadReminder).await;
    assert_eq!(users(&reminders), set_of(&["member", "watcher"]));
    assert_eq!(reminders.len(), 2);
    // Still unviewed: another message continues the reminded streak, no new count.
    portal_send(&d, "pat1", "message 5").await;
    assert_eq!(reminder_timers(&d).await.len(), 2);
    d.clock.advance(Duration::hours(48));
    tick(&d).await;
    assert_eq!(stored(&d, NotificationKind::UnreadReminder).await.len(), 2);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_restart_across_the_due_time_gives_exactly_one_reminder() {
    let mut d = clinic().await;
    set(&d, "member", json!({"unread_reminder": true})).await;
    let start = d.clock.now();
    portal_send(&d, "pat1", "Please call me back").await;
    // Down from 1 h to 30 h: the deadline passes while nothing runs.
    d.clock.set(start + Duration::hours(1));
    d.running.take().unwrap().shutdown().await.unwrap();
    d.clock.set(start + Duration::hours(30));
    d.restart().await.unwrap();
    // Start-up catches up; this tick waits for it (or does it).
    tick(&d).await;
    let reminders = stored(&d, NotificationKind::UnreadReminder).await;
    assert_eq!(users(&reminders), set_of(&["member"]));
    d.restart().await.unwrap();
    tick(&d).await;
    assert_eq!(stored(&d, NotificationKind::UnreadReminder).await.len(), 1);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_reminder_is_not_sent_to_a_user_who_lost_access() {
    let d = clinic().await;
    set(&d, "member", json!({"unread_reminder": true})).await;
    portal_send(&d, "pat1", "Hello?").await;
    d.user("p1", "member", &["ccm"]).await;
    d.clock.advance(Duration::hours(25));
    tick(&d).await;
    assert_eq!(stored(&d, NotificationKind::UnreadReminder).await, []);
    assert!(reminder_timers(&d).await.iter().all(|t| t.fired));
    d.stop().await.unwrap();
}

#[tokio::test]
async fn settings_merge_and_the_reminder_depends_on_new_patient_message() {
    let d = clinic().await;
    let (status, defaults) = staff(
        &d,
        Method::GET,
        "member",
        "/v1/staff/settings/notifications",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        defaults,
        json!({"new_patient_message": true, "unread_reminder": false, "two_way_texting": false,
               "channels": {"new_patient_message": ["in_app"], "unread_reminder": ["in_app"],
                            "two_way_texting": ["in_app"]},
               "email_unavailable": "no email gateway configured"})
    );
    let (_, on) = settings(&d, "member", json!({"unread_reminder": true})).await;
    assert_eq!(
        (
            on["new_patient_message"].clone(),
            on["unread_reminder"].clone()
        ),
        (json!(true), json!(true))
    );
    // Turning New Patient Message off turns the reminder off.
    let (_, off) = settings(&d, "member", json!({"new_patient_message": false})).await;
    assert_eq!(
        (
            off["new_patient_message"].clone(),
            off["unread_reminder"].clone()
        ),
        (json!(false), json!(false))
    );
    // Asking for the reminder alone is refused, naming the field, and changes nothing.
    for ask in [
        json!({"unread_reminder": true}),
        json!({"unread_reminder": true, "new_patient_message": false}),
        json!({"unread_reminder": true, "two_way_texting": true}),
    ] {
        let (status, body) = settings(&d, "member", ask).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"]["field"], "unread_reminder");
    }
    let (_, now) = staff(
        &d,
        Method::GET,
        "member",
        "/v1/staff/settings/notifications",
        None,
    )
    .await;
    assert_eq!(now, off);
    let (_, both) = settings(
        &d,
        "member",
        json!({"new_patient_message": true, "unread_reminder": true}),
    )
    .await;
    assert_eq!(both["unread_reminder"], true);
    // Channels merge per key.
    let (_, channels) = settings(
        &d,
        "member",
        json!({"channels": {"two_way_texting": ["email", "in_app"]}}),
    )
    .await;
    assert_eq!(
        channels["channels"],
        json!({"new_patient_message": ["in_app"], "unread_reminder": ["in_app"],
               "two_way_texting": ["in_app", "email"]})
    );
    let (status, body) = settings(&d, "member", json!({"channels": {"unread_reminder": []}})).await;
    assert_eq!(
        (status, body["error"]["field"].clone()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!("channels.unread_reminder")
        )
    );
    for bad in [
        json!({"channels": {"unread_reminder": ["sms"]}}),
        json!({"channels": {"fax": ["in_app"]}}),
        json!({"loud": true}),
        json!({"new_patient_message": "yes"}),
    ] {
        let (status, body) = settings(&d, "member", bad.clone()).await;
        assert!(status.is_client_error(), "{bad} -> {status} {body}");
    }
    let (_, after) = staff(
        &d,
        Method::GET,
        "member",
        "/v1/staff/settings/notifications",
        None,
    )
    .await;
    assert_eq!(after, channels);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn two_way_texting_reaches_the_panel_and_the_starter_with_the_setting_on() {
    let d = clinic().await;
    // member: panel, on; off: panel, New Patient Message off but Two-Way Texting on;
    // restricted: panel, on, no access; starter: not in the panel, on; outsider: on,
    // neither; watcher: notification user, setting off (the default).
    for user in ["member", "off", "restricted", "outsider"] {
        set(&d, user, json!({"two_way_texting": true})).await;
    }
    d.user("p1", "starter", &[]).await;
    set(&d, "starter", json!({"two_way_texting": true})).await;
    let state = d.daemon().state().clone();
    let config = state.settings.load_full();
    let cases = [
        (
            SmsStatus::Enabled,
            Some("starter"),
            &["member", "off", "starter"][..],
        ),
        (
            SmsStatus::Failed,
            Some("starter"),
            &["member", "off", "starter"][..],
        ),
        (SmsStatus::OptedOut, None, &["member", "off"][..]),
        (SmsStatus::Pending, Some("starter"), &[][..]),
    ];
    for (i, (status, started_by, expected)) in cases.into_iter().enumerate() {
        let subject = format!("change-{i}");
        let change = SmsStatusChange {
            patient_id: "pat1",
            subject: &subject,
            status,
            started_by,
            message_seq: None,
            at: d.clock.now(),
        };
        // Twice: the second time is a repeat and adds nothing.
        for _ in 0..2 {
            let mut notify = on_sms_status(&state.db, &config, &change).await.unwrap();
            state.writer.write(notify.take_unit()).await.unwrap();
            notify.publish(&state).await;
        }
        let rows: Vec<notification::Model> = stored(&d, NotificationKind::SmsStatus)
            .await
            .into_iter()
            .filter(|n| n.subject == subject)
            .collect();
        assert_eq!(users(&rows), set_of(expected), "{status:?}");
        assert_eq!(rows.len(), expected.len(), "{status:?}: once each");
        assert!(rows.iter().all(|n| n.sms_status == Some(status)));
    }
    let (_, list) = staff(&d, Method::GET, "starter", "/v1/staff/notifications", None).await;
    assert_eq!(list["notifications"][0]["kind"], "sms_status");
    assert_eq!(list["notifications"][0]["sms_status"], "failed");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_reminder_fired_meanwhile_is_skipped_and_the_rest_of_its_batch_fires() {
    let d = clinic().await;
    set(&d, "member", json!({"unread_reminder": true})).await;
    set(&d, "watcher", json!({"unread_reminder": true})).await;
    portal_send(&d, "pat1", "Anyone there?").await;
    let timers = reminder_timers(&d).await;
    assert_eq!(timers.len(), 2);
    // "Now" for the handler only: the daemon's own ticks see nothing due.
    let now = d.clock.now() + Duration::hours(25);
    let state = d.daemon().state().clone();
    // member's reminder is fired by someone else; its stale row comes due again.
    state
        .writer
        .write(caremsgd::timers::fire(
            TimerKind::UnreadReminder,
            &timers[0].subject,
            now,
        ))
        .await
        .unwrap();
    let handler = caremsgd::notifications::reminder::handler(&state);
    let (stale, fresh) = tokio::join!(
        handler.on_due(timers[0].clone(), now),
        handler.on_due(timers[1].clone(), now)
    );
    assert_eq!(stale.unwrap(), caremsgd::timers::FireOutcome::Skipped);
    assert_eq!(fresh.unwrap(), caremsgd::timers::FireOutcome::Fired);
    let again = handler.on_due(timers[1].clone(), now).await.unwrap();
    assert_eq!(again, caremsgd::timers::FireOutcome::Skipped);
    let reminders = stored(&d, NotificationKind::UnreadReminder).await;
    assert_eq!(users(&reminders), set_of(&["watcher"]));
    d.stop().await.unwrap();
}
