//! Conversations through the real HTTP server: sending (idempotency, gapless
//! sequence numbers, reachability, body limits), the staff views (list with the red
//! '!', search, paging), the Care Team panel and notify-me, the portal, live events,
//! and actor passivation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use caremsg_tests::{PORTAL_TOKEN, STAFF_TOKEN, TestDaemon, patient_body};
use caremsgd::clock::Clock;
use reqwest::{Method, StatusCode};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};

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

async fn portal(
    d: &TestDaemon,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    d.call(method, path, Some(PORTAL_TOKEN), body.as_ref())
        .await
}

async fn staff_send(
    d: &TestDaemon,
    user: &str,
    patient: &str,
    body: &str,
    txn: Option<&str>,
) -> (StatusCode, Value) {
    let mut payload = json!({"body": body});
    if let Some(txn) = txn {
        payload["client_txn_id"] = json!(txn);
    }
    staff(
        d,
        Method::POST,
        user,
        &format!("/v1/staff/patients/{patient}/messages"),
        Some(payload),
    )
    .await
}

async fn portal_send(d: &TestDaemon, patient: &str, body: &str) -> (StatusCode, Value) {
    portal(
        d,
        Method::POST,
        &format!("/v1/portal/patients/{patient}/messages"),
        Some(json!({"body": body})),
    )
    .await
}

/// `GET` of pat1's conversation by staff user `user` (which marks it read).
async fn open_conversation(d: &TestDaemon, user: &str) -> (StatusCode, Value) {
    staff(
        d,
        Method::GET,
        user,
        "/v1/staff/patients/pat1/conversation",
        None,
    )
    .await
}

/// A message without its deliveries' statuses, which the dispatcher moves on.
fn without_status(mut message: Value) -> Value {
    if let Some(deliveries) = message["deliveries"].as_array_mut() {
        for d in deliveries {
            d.as_object_mut().map(|o| o.remove("status"));
        }
    }
    message
}

async fn set_sms_enabled(d: &TestDaemon, patient: &str) {
    caremsg_entities::patient::Entity::update_many()
        .col_expr(
            caremsg_entities::patient::Column::SmsStatus,
            Expr::value(caremsg_entities::SmsStatus::Enabled),
        )
        .filter(caremsg_entities::patient::Column::Id.eq(patient))
        .exec(&d.daemon().state().db)
        .await
        .unwrap();
}

async fn message_count(d: &TestDaemon, patient: &str) -> u64 {
    caremsg_entities::message::Entity::find()
        .filter(caremsg_entities::message::Column::PatientId.eq(patient))
        .count(&d.daemon().state().db)
        .await
        .unwrap()
}

/// A practice p1 with program ccm, users u1 (care team), u2 (not on the team),
/// ur (restricted from ccm), and patient pat1 (in ccm, care team u1).
async fn clinic() -> TestDaemon {
    let d = TestDaemon::start().await.unwrap();
    d.practice("p1").await;
    d.program("p1", "ccm").await;
    d.user("p1", "u1", &[]).await;
    d.user("p1", "u2", &[]).await;
    d.user("p1", "ur", &["ccm"]).await;
    d.patient("p1", "pat1", &["ccm"], &["u1"]).await;
    d
}

#[tokio::test]
async fn sends_are_idempotent_and_reach_every_channel() {
    let d = clinic().await;
    let (status, first) = staff_send(&d, "u1", "pat1", "Hello from the clinic", Some("t-1")).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["seq"], 1);
    assert_eq!(first["direction"], "to_patient");
    assert_eq!(first["channel"], "portal", "SMS is not enabled yet");
    assert_eq!(first["author_user_id"], "u1");
    assert_eq!(
        first["deliveries"],
        json!([{"channel": "portal", "status": "queued"}])
    );

    // A retry returns the first result; another body with the same id is refused.
    let (status, again) = staff_send(&d, "u1", "pat1", "Hello from the clinic", Some("t-1")).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        without_status(again),
        without_status(first.clone()),
        "the same message (its delivery may have moved on)"
    );
    let (status, err) = staff_send(&d, "u1", "pat1", "Something else", Some("t-1")).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("txn_id_reused"))
    );
    // A retry is answered from what its id stored even when a new message could no
    // longer be sent (the patient left the portal), and an unknown id is refused.
    let mut unenrolled = patient_body("p1", &["ccm"], &["u1"]);
    unenrolled["portal_enrolled"] = json!(false);
    assert_eq!(
        d.admin_put("/v1/admin/patients/pat1", unenrolled).await.0,
        StatusCode::OK
    );
    let (status, again) = staff_send(&d, "u1", "pat1", "Hello from the clinic", Some("t-1")).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(without_status(again), without_status(first.clone()));
    let (status, err) = staff_send(&d, "u1", "pat1", "Something else", Some("t-1")).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("txn_id_reused"))
    );
    let (status, err) = staff_send(&d, "u1", "pat1", "Hello from the clinic", Some("t-9")).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("patient_unreachable"))
    );
    // The id is scoped to its author: another user may use it.
    d.patient("p1", "pat1", &["ccm"], &["u1", "u2"]).await;
    let (status, other) = staff_send(&d, "u2", "pat1", "Different author", Some("t-1")).await;
    assert_eq!(
        (status, other["seq"].as_i64()),
        (StatusCode::CREATED, Some(2))
    );

    // Two concurrent requests with one id store one message.
    let (a, b) = tokio::join!(
        staff_send(&d, "u1", "pat1", "Concurrent", Some("t-2")),
        staff_send(&d, "u1", "pat1", "Concurrent", Some("t-2"))
    );
    assert_eq!(a.0, StatusCode::CREATED);
    assert_eq!(without_status(a.1), without_status(b.1));
    assert_eq!(message_count(&d, "pat1").await, 3);

    // With SMS enabled the message also goes out by SMS, with the sender's name when
    // the practice asks for it.
    set_sms_enabled(&d, "pat1").await;
    let mut practice = caremsg_tests::practice_body("p1");
    practice["sign_outbound_sms"] = json!(true);
    d.admin_put("/v1/admin/practices/p1", practice).await;
    let (status, sms) = staff_send(&d, "u1", "pat1", "By text too", None).await;
    assert_eq!(status, StatusCode::CREATED, "{sms}");
    assert_eq!(sms["channel"], "sms");
    let channels: Vec<&str> = sms["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, ["portal", "sms"]);
    let stored = caremsg_entities::delivery::Entity::find()
        .filter(
            caremsg_entities::delivery::Column::Channel.eq(caremsg_entities::DeliveryChannel::Sms),
        )
        .one(&d.daemon().state().db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.body.as_deref(), Some("By text too\n- User u1"));
    assert_eq!(stored.recipient.as_deref(), Some("+12015550123"));
    // A page shows each message with its own deliveries, in channel order, as the
    // send answered them: one delivery for the portal-only messages, two for the last.
    let (status, page) = open_conversation(&d, "u1").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4);
    assert_eq!(
        without_status(messages[0].clone()),
        without_status(first.clone())
    );
    assert_eq!(without_status(messages[3].clone()), without_status(sms));
    for message in &messages[..3] {
        assert_eq!(message["deliveries"].as_array().unwrap().len(), 1);
    }
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_hundred_concurrent_sends_get_gapless_sequence_numbers() {
    let d = clinic().await;
    let mut sends = Vec::new();
    for i in 0..100 {
        sends.push(staff_send(
            &d,
            "u1",
            "pat1",
            Box::leak(format!("message {i}").into_boxed_str()),
            None,
        ));
    }
    let mut seqs: Vec<i64> = futures::future::join_all(sends)
        .await
        .into_iter()
        .map(|(status, body)| {
            assert_eq!(status, StatusCode::CREATED, "{body}");
            body["seq"].as_i64().unwrap()
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    d.stop().await.unwrap();
}

#[tokio::test]
async fn body_rules_and_unreachable_patients() {
    let d = clinic().await;
    let (status, err) = staff_send(&d, "u1", "pat1", "   \n ", None).await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("body"))
    );
    let long = "x".repeat(10_001);
    let (status, _) = staff_send(&d, "u1", "pat1", &long, None).await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "over the portal limit"
    );
    let (status, _) = staff_send(&d, "u1", "pat1", &"é".repeat(10_000), None).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "limits count characters, not bytes"
    );
    set_sms_enabled(&d, "pat1").await;
    let (status, err) = staff_send(&d, "u1", "pat1", &"x".repeat(1_601), None).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("body_too_long"))
    );
    let (status, _) = staff_send(&d, "u1", "pat1", &"x".repeat(1_600), None).await;
    assert_eq!(status, StatusCode::CREATED);

    // Not portal-enrolled and no SMS: 409, nothing stored.
    let mut body = patient_body("p1", &[], &["u1"]);
    body["portal_enrolled"] = json!(false);
    d.admin_put("/v1/admin/patients/lonely", body).await;
    let (status, err) = staff_send(&d, "u1", "lonely", "Anyone there?", Some("x")).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("patient_unreachable"))
    );
    assert_eq!(message_count(&d, "lonely").await, 0);
    d.stop().await.unwrap();
}

async fn unread(d: &TestDaemon, user: &str, patient: &str) -> bool {
    let (status, list) = staff(d, Method::GET, user, "/v1/staff/patients", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    list["patients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["patient_id"] == patient)
        .unwrap()["has_unread"]
        .as_bool()
        .unwrap()
}

#[tokio::test]
async fn the_red_exclamation_mark() {
    let d = clinic().await;
    d.patient("p1", "pat1", &["ccm"], &["u1", "u2"]).await;
    assert!(!unread(&d, "u1", "pat1").await, "an empty conversation");
    portal_send(&d, "pat1", "I have a question").await;
    assert!(unread(&d, "u1", "pat1").await, "the patient's message");
    let (status, _) = open_conversation(&d, "u1").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!unread(&d, "u1", "pat1").await, "viewing clears it");
    staff_send(&d, "u1", "pat1", "My own answer", None).await;
    assert!(
        !unread(&d, "u1", "pat1").await,
        "my own message never counts"
    );
    assert!(
        unread(&d, "u2", "pat1").await,
        "u2 has viewed neither message"
    );
    staff_send(&d, "u2", "pat1", "A colleague's note", None).await;
    assert!(
        unread(&d, "u1", "pat1").await,
        "another user's message counts"
    );
    assert!(
        !unread(&d, "u2", "pat1").await,
        "sending marks read for its author"
    );
    let (status, read) = staff(&d, Method::POST, "u1", "/v1/staff/patients/pat1/read", None).await;
    assert_eq!(
        (status, read["last_read_seq"].as_i64()),
        (StatusCode::OK, Some(3))
    );
    assert!(!unread(&d, "u1", "pat1").await, "explicit mark-read");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn notify_me_flow_and_the_care_team_panel() {
    let d = clinic().await;
    let open = |user: &'static str| {
        staff(
            &d,
            Method::GET,
            user,
            "/v1/staff/patients/pat1/conversation",
            None,
        )
    };
    let (_, page) = open("u1").await;
    assert_eq!(
        page["ask_to_notify"], false,
        "a care team member is not asked"
    );
    let (_, page) = open("u2").await;
    assert_eq!(page["ask_to_notify"], true);
    // "No" records nothing: the prompt comes again.
    let (_, page) = open("u2").await;
    assert_eq!(page["ask_to_notify"], true);
    let (status, list) = staff(&d, Method::GET, "u2", "/v1/staff/patients", None).await;
    assert_eq!(
        (status, list["patients"].as_array().unwrap().len()),
        (StatusCode::OK, 0)
    );

    let (status, out) = staff(
        &d,
        Method::PUT,
        "u2",
        "/v1/staff/patients/pat1/notify",
        None,
    )
    .await;
    assert_eq!(
        (status, out["role"].as_str()),
        (StatusCode::OK, Some("notification_user"))
    );
    let (_, page) = open("u2").await;
    assert_eq!(page["ask_to_notify"], false);
    let (_, list) = staff(&d, Method::GET, "u2", "/v1/staff/patients", None).await;
    assert_eq!(
        list["patients"][0]["patient_id"], "pat1",
        "a notification user has the patient on the list"
    );

    // The panel lists restricted members too, not notified.
    d.patient("p1", "pat1", &["ccm"], &["u1", "ur"]).await;
    let (status, panel) = staff(
        &d,
        Method::GET,
        "u1",
        "/v1/staff/patients/pat1/care-team",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{panel}");
    assert_eq!(
        panel,
        json!([
            {"user_id": "u1", "name": "User u1", "role": "care_team", "notified": true},
            {"user_id": "ur", "name": "User ur", "role": "care_team", "notified": false},
            {"user_id": "u2", "name": "User u2", "role": "notification_user", "notified": true},
        ])
    );

    let (status, _) = staff(
        &d,
        Method::DELETE,
        "u2",
        "/v1/staff/patients/pat1/notify",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, page) = open("u2").await;
    assert_eq!(page["ask_to_notify"], true);
    let (status, err) = staff(
        &d,
        Method::DELETE,
        "u1",
        "/v1/staff/patients/pat1/notify",
        None,
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("care_team_member"))
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn every_staff_and_portal_path_obeys_the_access_rule() {
    let d = clinic().await;
    d.practice("p2").await;
    d.user("p2", "other", &[]).await;
    d.patient("p1", "pat1", &["ccm"], &["u1", "ur"]).await;
    let paths: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "/v1/staff/patients/pat1/conversation", None),
        (
            Method::POST,
            "/v1/staff/patients/pat1/messages",
            Some(json!({"body": "hi"})),
        ),
        (Method::POST, "/v1/staff/patients/pat1/read", None),
        (Method::GET, "/v1/staff/patients/pat1/care-team", None),
        (Method::PUT, "/v1/staff/patients/pat1/notify", None),
        (Method::DELETE, "/v1/staff/patients/pat1/notify", None),
    ];
    for (method, path, body) in &paths {
        let (status, err) = staff(&d, method.clone(), "other", path, body.clone()).await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{method} {path}: other practice"
        );
        let (status, err) = staff(&d, method.clone(), "ur", path, body.clone()).await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("access_restricted")),
            "{method} {path}: restricted"
        );
        let (status, _) = staff(&d, method.clone(), "nobody", path, body.clone()).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{method} {path}: unknown user"
        );
        let (status, _) = d
            .call(method.clone(), path, Some(PORTAL_TOKEN), body.as_ref())
            .await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{method} {path}: portal token"
        );
        let (status, _) = d.call(method.clone(), path, None, body.as_ref()).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{method} {path}: no token"
        );
    }
    for (method, path, body) in &paths {
        let (status, body) = staff(&d, method.clone(), "u2", path, body.clone()).await;
        assert!(
            status.is_success(),
            "{method} {path}: unrestricted user of the practice: {status} {body}"
        );
    }
    // Lists and searches leave inaccessible patients out; the others see them.
    for q in [
        "pat",
        "Pat",
        "example",
        "pat1",
        "1950-04-07",
        "04/07/1950",
        "(201) 555-0123",
        "+12015550123",
    ] {
        let path = format!("/v1/staff/patients/search?q={}", urlencode(q));
        let (status, found) = staff(&d, Method::GET, "u2", &path, None).await;
        assert_eq!(status, StatusCode::OK, "{q}: {found}");
        assert_eq!(
            found["patients"].as_array().unwrap().len(),
            1,
            "{q}: {found}"
        );
        let (_, found) = staff(&d, Method::GET, "ur", &path, None).await;
        assert_eq!(found["patients"], json!([]), "{q}: restricted user");
        let (_, found) = staff(&d, Method::GET, "other", &path, None).await;
        assert_eq!(found["patients"], json!([]), "{q}: other practice");
    }
    let (_, list) = staff(&d, Method::GET, "ur", "/v1/staff/patients", None).await;
    assert_eq!(
        list["patients"],
        json!([]),
        "a restricted care team member does not list the patient"
    );
    // Portal paths: staff and admin tokens are refused.
    for path in [
        "/v1/portal/patients/pat1/conversation",
        "/v1/portal/patients/pat1/events",
    ] {
        let (status, _) = staff(&d, Method::GET, "u1", path, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
    }
    d.stop().await.unwrap();
}

fn urlencode(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn search_finds_by_word_prefix_phone_date_and_id() {
    let d = clinic().await;
    let mut body = patient_body("p1", &[], &[]);
    body["first_name"] = json!("Mary Ann");
    body["last_name"] = json!("O'Neil");
    body["mobile_phone"] = json!("201-555-0142");
    body["date_of_birth"] = json!("1961-11-30");
    d.admin_put("/v1/admin/patients/mary", body).await;
    let d = &d;
    let find = |q: &'static str| async move {
        let (status, found) = staff(
            d,
            Method::GET,
            "u1",
            &format!("/v1/staff/patients/search?q={}", urlencode(q)),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{found}");
        found["patients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["patient_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(find("ann").await, ["mary"], "any word prefix");
    assert_eq!(
        find("MARY o'n").await,
        ["mary"],
        "case-insensitive, several words"
    );
    assert_eq!(
        find("ary").await,
        Vec::<String>::new(),
        "not the middle of a word"
    );
    assert_eq!(find("2015550142").await, ["mary"]);
    assert_eq!(find("+1 (201) 555-0142").await, ["mary"]);
    assert_eq!(find("11/30/1961").await, ["mary"]);
    assert_eq!(find("1961-11-30").await, ["mary"]);
    assert_eq!(find("mary").await, ["mary"], "the platform's id");
    assert_eq!(
        find("%").await,
        Vec::<String>::new(),
        "LIKE wildcards are literal"
    );
    let (status, err) = staff(d, Method::GET, "u1", "/v1/staff/patients/search?q=", None).await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("q"))
    );
}

#[tokio::test]
async fn paging_neither_skips_nor_repeats() {
    let d = clinic().await;
    for i in 0..6 {
        d.patient("p1", &format!("pt{i}"), &[], &["u1"]).await;
        d.clock.advance(chrono::Duration::seconds(1));
        portal_send(&d, &format!("pt{i}"), "hello").await;
    }
    // Newest activity first: pt5 … pt0, then pat1 (no messages).
    let (_, first) = staff(&d, Method::GET, "u1", "/v1/staff/patients?limit=3", None).await;
    let ids = |page: &Value| {
        page["patients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["patient_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&first), ["pt5", "pt4", "pt3"]);
    // New messages while paging: pt0 jumps to the top of a fresh list, but this walk
    // goes on in its snapshot order.
    d.clock.advance(chrono::Duration::seconds(1));
    portal_send(&d, "pt0", "news").await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = staff(
        &d,
        Method::GET,
        "u1",
        &format!("/v1/staff/patients?limit=3&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(ids(&second), ["pt2", "pt1", "pt0"]);
    let cursor = second["next_cursor"].as_str().unwrap();
    let (_, third) = staff(
        &d,
        Method::GET,
        "u1",
        &format!("/v1/staff/patients?limit=3&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(ids(&third), ["pat1"]);
    assert_eq!(third["next_cursor"], Value::Null);
    let (_, fresh) = staff(&d, Method::GET, "u1", "/v1/staff/patients?limit=1", None).await;
    assert_eq!(ids(&fresh), ["pt0"]);
    let (status, err) = staff(&d, Method::GET, "u1", "/v1/staff/patients?cursor=zz", None).await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("cursor"))
    );

    // A conversation pages backwards, each page oldest first.
    for i in 0..4 {
        staff_send(&d, "u1", "pat1", &format!("m{i}"), None).await;
    }
    let seqs = |page: &Value| {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    let (_, page) = staff(
        &d,
        Method::GET,
        "u1",
        "/v1/staff/patients/pat1/conversation?limit=3",
        None,
    )
    .await;
    assert_eq!(seqs(&page), [2, 3, 4]);
    assert_eq!(page["next_cursor"], 2);
    let (_, page) = staff(
        &d,
        Method::GET,
        "u1",
        "/v1/staff/patients/pat1/conversation?limit=3&before=2",
        None,
    )
    .await;
    assert_eq!(seqs(&page), [1]);
    assert_eq!(page["next_cursor"], Value::Null);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn portal_flows() {
    let d = clinic().await;
    staff_send(&d, "u1", "pat1", "Your results are in", None).await;
    let (status, sent) = portal(
        &d,
        Method::POST,
        "/v1/portal/patients/pat1/messages",
        Some(json!({"body": "Thanks!", "client_txn_id": "p-1"})),
    )
    .await;
    assert_eq!(
        (status, sent["direction"].as_str(), sent["channel"].as_str()),
        (StatusCode::CREATED, Some("from_patient"), Some("portal"))
    );
    let (_, again) = portal(
        &d,
        Method::POST,
        "/v1/portal/patients/pat1/messages",
        Some(json!({"body": "Thanks!", "client_txn_id": "p-1"})),
    )
    .await;
    assert_eq!(
        without_status(again),
        without_status(sent.clone()),
        "idempotent"
    );
    let (status, page) = portal(
        &d,
        Method::GET,
        "/v1/portal/patients/pat1/conversation",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);
    assert!(
        page["messages"][0].get("read_by_patient_at").is_some(),
        "sending marked the staff message read: {page}"
    );

    staff_send(&d, "u1", "pat1", "One more thing", None).await;
    let (_, page) = open_conversation(&d, "u1").await;
    assert!(page["messages"][2].get("read_by_patient_at").is_none());
    d.clock.advance(chrono::Duration::minutes(5));
    let (status, read) = portal(&d, Method::POST, "/v1/portal/patients/pat1/read", None).await;
    assert_eq!(
        (status, read["last_read_seq"].as_i64()),
        (StatusCode::OK, Some(3))
    );
    let (_, page) = open_conversation(&d, "u1").await;
    let expected = (d.clock.now()).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    assert_eq!(
        page["messages"][2]["read_by_patient_at"].as_str(),
        Some(expected.as_str())
    );

    // Practice without portal chat wins over enrollment; then enrollment.
    let mut body = patient_body("p1", &[], &[]);
    body["portal_enrolled"] = json!(false);
    d.admin_put("/v1/admin/patients/offline", body).await;
    let (status, err) = portal_send(&d, "offline", "hi").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("portal_not_enrolled"))
    );
    let mut practice = caremsg_tests::practice_body("p1");
    practice["portal_enabled"] = json!(false);
    d.admin_put("/v1/admin/practices/p1", practice).await;
    let (status, err) = portal_send(&d, "offline", "hi").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("portal_disabled"))
    );
    let (status, err) = portal(
        &d,
        Method::GET,
        "/v1/portal/patients/pat1/conversation",
        None,
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("portal_disabled"))
    );
    let (status, _) = portal_send(&d, "nobody", "hi").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    d.stop().await.unwrap();
}

/// Reads server-sent events from `response` until one named `name` arrives.
async fn next_event(response: &mut reqwest::Response, buffer: &mut String, name: &str) -> Value {
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let event = block
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("");
            let data = block
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("");
            if event == name {
                return serde_json::from_str(data).unwrap();
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

#[tokio::test]
async fn live_events_reach_staff_and_portal() {
    let d = clinic().await;
    let mut staff_stream = d
        .http
        .get(format!("{}/v1/staff/events", d.base))
        .bearer_auth(STAFF_TOKEN)
        .header("X-Caremsg-User", "u1")
        .send()
        .await
        .unwrap();
    assert_eq!(staff_stream.status(), StatusCode::OK);
    let mut portal_stream = d
        .http
        .get(format!("{}/v1/portal/patients/pat1/events", d.base))
        .bearer_auth(PORTAL_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(portal_stream.status(), StatusCode::OK);
    // Streams are subscribed once their headers are out; a message on another
    // patient u1 does not follow must not show up first.
    d.patient("p1", "elsewhere", &[], &[]).await;
    portal_send(&d, "elsewhere", "not for u1").await;
    portal_send(&d, "pat1", "From the portal").await;
    let mut buffer = String::new();
    let event = next_event(&mut staff_stream, &mut buffer, "message").await;
    assert_eq!(
        event,
        json!({"patient_id": "pat1", "seq": 1, "direction": "from_patient", "channel": "portal", "body": "From the portal"})
    );
    staff_send(&d, "u1", "pat1", "From the clinic", None).await;
    let mut buffer = String::new();
    let first = next_event(&mut portal_stream, &mut buffer, "message").await;
    assert_eq!(first["seq"], 1);
    let second = next_event(&mut portal_stream, &mut buffer, "message").await;
    assert_eq!(
        (second["seq"].as_i64(), second["body"].as_str()),
        (Some(2), Some("From the clinic"))
    );
    // Shutdown ends the streams cleanly.
    d.stop().await.unwrap();
    let mut rest = Vec::new();
    while let Ok(Some(chunk)) = staff_stream.chunk().await {
        rest.push(chunk);
    }
}

#[tokio::test]
async fn idle_actors_passivate_and_come_back_intact() {
    let d = TestDaemon::start_with(|text| {
        text.replace(
            "[sms_auth]",
            "[conversations]\nidle_timeout = \"30ms\"\n\n[sms_auth]",
        )
    })
    .await
    .unwrap();
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    d.patient("p1", "pat1", &[], &["u1"]).await;
    staff_send(&d, "u1", "pat1", "before", Some("t")).await;
    let conversations = &d.daemon().state().conversations;
    // On a busy machine the 30 ms may already have passed: at most this one is live.
    assert!(conversations.live() <= 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while conversations.live() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the actor never passivated"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // A new actor rebuilds from the database: the sequence goes on and the
    // transaction id is still known.
    let (_, replay) = staff_send(&d, "u1", "pat1", "before", Some("t")).await;
    assert_eq!(replay["seq"], 1);
    let (status, after) = staff_send(&d, "u1", "pat1", "after", None).await;
    assert_eq!(
        (status, after["seq"].as_i64()),
        (StatusCode::CREATED, Some(2))
    );
    d.stop().await.unwrap();
}

/// `conversations.max_live` bounds the conversations held in memory: a new one first
/// unloads the least recently used, which finishes what it was sent and stops; its
/// patient's next message starts a new actor that carries on from the database.
#[tokio::test]
async fn conversations_in_memory_stay_within_max_live() {
    let d = TestDaemon::start_with(|text| {
        text.replace("[sms_auth]", "[conversations]\nmax_live = 4\n\n[sms_auth]")
    })
    .await
    .unwrap();
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    for i in 1..=24 {
        d.patient("p1", &format!("pat{i}"), &[], &["u1"]).await;
    }
    let state = d.daemon().state();
    let conversations = &state.conversations;
    for i in 1..=4 {
        staff_send(&d, "u1", &format!("pat{i}"), "first", None).await;
    }
    // pat1 used again: pat2 is now the least recently used.
    staff_send(&d, "u1", "pat1", "second", None).await;
    assert_eq!((conversations.live(), conversations.staying()), (4, 4));
    let (status, _) = staff_send(&d, "u1", "pat5", "first", None).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(conversations.staying(), 4);
    assert_eq!(state.metrics.actors_unloaded.get(), 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while conversations.is_live("pat2") {
        assert!(
            std::time::Instant::now() < deadline,
            "the unloaded actor never stopped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for kept in ["pat1", "pat3", "pat4", "pat5"] {
        assert!(conversations.is_live(kept), "{kept} was unloaded");
    }
    // pat2's next message carries on from the database.
    let (status, body) = staff_send(&d, "u1", "pat2", "second", None).await;
    assert_eq!(
        (status, body["seq"].as_i64()),
        (StatusCode::CREATED, Some(2))
    );

    // Many patients at once: every send is stored, and the bound holds.
    let sends = (5..=24).map(|i| {
        let d = &d;
        async move { staff_send(d, "u1", &format!("pat{i}"), "burst", None).await }
    });
    for (status, body) in futures::future::join_all(sends).await {
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    assert!(conversations.staying() <= 4, "{}", conversations.staying());
    let (status, body) = staff_send(&d, "u1", "pat5", "third", None).await;
    assert_eq!(
        (status, body["seq"].as_i64()),
        (StatusCode::CREATED, Some(3))
    );
    d.stop().await.unwrap();
}

/// A warm actor remembers the patient's rows between portal sends (no read), so this
/// is the test that what it remembers never outlives an admin change: the very next
/// portal send after the answer to each admin write sees it.
#[tokio::test]
async fn a_warm_actor_sees_every_admin_change_at_the_next_portal_send() {
    let d = clinic().await;
    let code = |(status, body): (StatusCode, Value)| (status, body["error"]["code"].clone());
    for i in 0..3 {
        let (status, body) = portal_send(&d, "pat1", &format!("warm {i}")).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let mut unenrolled = patient_body("p1", &["ccm"], &["u1"]);
    unenrolled["portal_enrolled"] = json!(false);
    assert_eq!(
        d.admin_put("/v1/admin/patients/pat1", unenrolled).await.0,
        StatusCode::OK
    );
    assert_eq!(
        code(portal_send(&d, "pat1", "unenrolled").await),
        (StatusCode::CONFLICT, json!("portal_not_enrolled"))
    );
    d.patient("p1", "pat1", &["ccm"], &["u1"]).await;
    assert_eq!(
        portal_send(&d, "pat1", "enrolled").await.0,
        StatusCode::CREATED
    );
    let mut practice = caremsg_tests::practice_body("p1");
    practice["portal_enabled"] = json!(false);
    assert_eq!(
        d.admin_put("/v1/admin/practices/p1", practice).await.0,
        StatusCode::OK
    );
    assert_eq!(
        code(portal_send(&d, "pat1", "disabled").await),
        (StatusCode::CONFLICT, json!("portal_disabled"))
    );
    d.practice("p1").await;
    assert_eq!(
        portal_send(&d, "pat1", "enabled").await.0,
        StatusCode::CREATED
    );
    let (status, _) = d
        .call(
            Method::DELETE,
            "/v1/admin/patients/pat1",
            Some(caremsg_tests::ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        portal_send(&d, "pat1", "deleted").await.0,
        StatusCode::NOT_FOUND
    );
    d.patient("p1", "pat1", &["ccm"], &["u1"]).await;
    assert_eq!(portal_send(&d, "pat1", "back").await.0, StatusCode::CREATED);
    d.stop().await.unwrap();
}

/// The database reads of each request kind, the patient's actor warm: each read is a
/// round trip (to a connection's thread on SQLite, to the server on PostgreSQL), and
/// the clinic benchmark's figures are made of them. What the actor knows because it
/// is the conversation's only writer (the newest sequence number, read markers,
/// whether a staff message is unread by the patient) it does not read again; the
/// access check is one statement; notification recipients and the start of each
/// one's unread streak are one statement. Background work (the dispatcher, timers)
/// only adds reads, so the fewest of five tries is the request's own.
#[tokio::test]
async fn warm_requests_read_only_what_they_must() {
    let d = TestDaemon::start().await.unwrap();
    d.practice("p1").await;
    for user in ["u1", "u2", "u3"] {
        d.user("p1", user, &[]).await;
    }
    d.patient("p1", "pat1", &[], &["u1", "u2", "u3"]).await;
    for user in ["u1", "u2", "u3"] {
        let (status, _) = staff(
            &d,
            Method::PUT,
            user,
            "/v1/staff/settings/notifications",
            Some(json!({"new_patient_message": true, "unread_reminder": true})),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    // Warm the actor and every path once.
    assert_eq!(
        staff_send(&d, "u1", "pat1", "hello", None).await.0,
        StatusCode::CREATED
    );
    assert_eq!(portal_send(&d, "pat1", "hi").await.0, StatusCode::CREATED);
    let open = "/v1/staff/patients/pat1/conversation";
    assert_eq!(
        staff(&d, Method::GET, "u1", open, None).await.0,
        StatusCode::OK
    );

    let reads = "caremsg_db_reader_statements_total";
    // [scraping the metrics, portal send, staff send, staff open]
    let mut fewest = [f64::MAX; 4];
    for i in 0..5 {
        let mut counts = vec![d.metric(reads).await];
        counts.push(d.metric(reads).await);
        let (status, _) = portal(
            &d,
            Method::POST,
            "/v1/portal/patients/pat1/messages",
            Some(json!({"body": format!("question {i}"), "client_txn_id": format!("p{i}")})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        counts.push(d.metric(reads).await);
        let txn = format!("s{i}");
        let (status, _) = staff_send(&d, "u1", "pat1", &format!("answer {i}"), Some(&txn)).await;
        assert_eq!(status, StatusCode::CREATED);
        counts.push(d.metric(reads).await);
        let (status, _) = staff(&d, Method::GET, "u2", open, None).await;
        assert_eq!(status, StatusCode::OK);
        counts.push(d.metric(reads).await);
        for (slot, pair) in fewest.iter_mut().zip(counts.windows(2)) {
            *slot = slot.min(pair[1] - pair[0]);
        }
    }
    let scrape = fewest[0];
    let [portal_send_reads, staff_send_reads, open_reads] =
        [fewest[1] - scrape, fewest[2] - scrape, fewest[3] - scrape];
    println!(
        "reads: portal send {portal_send_reads}, staff send {staff_send_reads}, staff open {open_reads}"
    );
    // The recipients with their streaks. The patient with its practice is
    // remembered by the warm actor (until an admin write or an SMS step); the
    // transaction id is looked up only when a send fails (the unique index refuses a
    // second one). No dispatcher searches for work: the patient's message queued none.
    assert!(
        portal_send_reads <= 1.0,
        "portal send: {portal_send_reads} reads"
    );
    // The access check (which also reads the practice's sending number; the actor
    // uses its rows); then the dispatchers look for the new delivery. The acting
    // user is remembered from the previous request (`access::Users`).
    assert!(
        staff_send_reads <= 4.0,
        "staff send: {staff_send_reads} reads"
    );
    // The access check, the page (its messages with their deliveries, one
    // statement; the newest message is the newest sequence number). The reminder the
    // view ends is removed by the write itself, which reads nothing first.
    assert!(open_reads <= 2.0, "staff open: {open_reads} reads");
    d.stop().await.unwrap();
}
