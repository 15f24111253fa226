//! One error contract for every input (issue #14, items 6–9): query strings, path
//! parameters and bodies answer `{"error":{"code","message","field"?}}` with a 4xx,
//! never plain text, never a 5xx, and never repeat what was sent.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use caremsg_entities::{SmsStatus, message, patient};
use caremsg_tests::{ADMIN_TOKEN, PORTAL_TOKEN, STAFF_TOKEN, TestDaemon, practice_body};
use reqwest::StatusCode;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};

/// Practice p1, user u1 on the care team of pat1 (portal enrolled, mobile phone).
async fn clinic() -> TestDaemon {
    let d = TestDaemon::start().await.unwrap();
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    d.patient("p1", "pat1", &[], &["u1"]).await;
    d
}

/// A raw request: status, content type and body text.
async fn raw(
    d: &TestDaemon,
    method: reqwest::Method,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: Option<Vec<u8>>,
) -> (StatusCode, String, String) {
    let mut request = d
        .http
        .request(method, format!("{}{}", d.base, path))
        .bearer_auth(token)
        .header("X-Caremsg-User", "u1");
    if let Some(content_type) = content_type {
        request = request.header("Content-Type", content_type);
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, content_type, response.text().await.unwrap())
}

/// Asserts a JSON error with `status`, `code` and `field`, and that `canary` (what
/// the client sent) appears nowhere in the answer.
fn assert_error(
    answer: &(StatusCode, String, String),
    status: StatusCode,
    code: &str,
    field: Option<&str>,
    canary: &str,
) {
    let (got, content_type, text) = answer;
    assert_eq!(*got, status, "{text}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}: {text}"
    );
    let body: Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_eq!(body["error"]["code"], code, "{text}");
    assert_eq!(body["error"]["field"].as_str(), field, "{text}");
    assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    assert!(
        canary.is_empty() || !text.contains(canary),
        "the answer repeats the input: {text}"
    );
}

async fn get(d: &TestDaemon, path: &str, token: &str) -> (StatusCode, String, String) {
    raw(d, reqwest::Method::GET, path, token, None, None).await
}

#[tokio::test]
async fn query_and_path_errors_answer_json_without_echoing() {
    let d = clinic().await;
    let bad = StatusCode::BAD_REQUEST;
    // An unknown parameter: named nowhere in the answer, which lists the known ones.
    let answer = get(&d, "/v1/staff/patients?Zyxecho=1", STAFF_TOKEN).await;
    assert_error(&answer, bad, "unknown_parameter", None, "Zyxecho");
    assert!(answer.2.contains("limit"), "{}", answer.2);
    // Mistyped values.
    let answer = get(&d, "/v1/staff/patients?limit=Zyxecho", STAFF_TOKEN).await;
    assert_error(&answer, bad, "invalid_query", Some("limit"), "Zyxecho");
    let answer = get(&d, "/v1/staff/patients?limit=-1", STAFF_TOKEN).await;
    assert_error(&answer, bad, "invalid_query", Some("limit"), "");
    let answer = get(
        &d,
        "/v1/staff/patients/pat1/conversation?before=Zyxecho",
        STAFF_TOKEN,
    )
    .await;
    assert_error(&answer, bad, "invalid_query", Some("before"), "Zyxecho");
    let answer = get(
        &d,
        "/v1/portal/patients/pat1/conversation?limit=1.5",
        PORTAL_TOKEN,
    )
    .await;
    assert_error(&answer, bad, "invalid_query", Some("limit"), "");
    let answer = get(&d, "/v1/staff/notifications?limit=x", STAFF_TOKEN).await;
    assert_error(&answer, bad, "invalid_query", Some("limit"), "");
    // Values the handler checks: 422 naming the parameter.
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let answer = get(&d, "/v1/staff/patients?limit=0", STAFF_TOKEN).await;
    assert_error(&answer, unprocessable, "invalid_field", Some("limit"), "");
    let answer = get(&d, "/v1/staff/patients?cursor=Zyxecho", STAFF_TOKEN).await;
    assert_error(
        &answer,
        unprocessable,
        "invalid_field",
        Some("cursor"),
        "Zyxecho",
    );
    let answer = get(
        &d,
        "/v1/staff/patients/pat1/conversation?before=0",
        STAFF_TOKEN,
    )
    .await;
    assert_error(&answer, unprocessable, "invalid_field", Some("before"), "");
    // A repeated parameter.
    let answer = get(&d, "/v1/staff/patients/search?q=Pat&q=Zyxecho", STAFF_TOKEN).await;
    assert_error(&answer, bad, "repeated_parameter", Some("q"), "Zyxecho");
    // Not UTF-8, or a control character, in a query value.
    let answer = get(&d, "/v1/staff/patients/search?q=%FF", STAFF_TOKEN).await;
    assert_error(&answer, bad, "invalid_query", Some("q"), "");
    let answer = get(&d, "/v1/staff/patients/search?q=Pat%00", STAFF_TOKEN).await;
    assert_error(&answer, bad, "invalid_query", Some("q"), "");
    // Not UTF-8, or a control character, in a path id (PostgreSQL refuses NUL in text).
    for path in [
        "/v1/staff/patients/%FF/conversation",
        "/v1/staff/patients/pat%00/conversation",
        "/v1/staff/patients/pat%01/sms",
    ] {
        let answer = get(&d, path, STAFF_TOKEN).await;
        assert_error(&answer, bad, "invalid_path", Some("patient_id"), "");
    }
    let answer = get(&d, "/v1/portal/patients/%FF%FE/conversation", PORTAL_TOKEN).await;
    assert_error(&answer, bad, "invalid_path", Some("patient_id"), "");
    let answer = raw(
        &d,
        reqwest::Method::DELETE,
        "/v1/admin/users/u%00",
        ADMIN_TOKEN,
        None,
        None,
    )
    .await;
    assert_error(&answer, bad, "invalid_path", Some("user_id"), "");
    let answer = raw(
        &d,
        reqwest::Method::POST,
        "/v1/staff/notifications/%FF/read",
        STAFF_TOKEN,
        None,
        None,
    )
    .await;
    assert_error(&answer, bad, "invalid_path", Some("notification_id"), "");
    // Good requests still pass.
    assert_eq!(
        get(&d, "/v1/staff/patients?limit=5", STAFF_TOKEN).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&d, "/v1/staff/patients/search?q=Pat%20Ex", STAFF_TOKEN)
            .await
            .0,
        StatusCode::OK
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn sms_start_reads_its_body_like_every_other_endpoint() {
    let d = clinic().await;
    let path = "/v1/staff/patients/pat1/sms/start";
    let post = reqwest::Method::POST;
    let limit = d.daemon().state().settings.load().server.max_body_bytes;
    // 10 MB: a JSON 413, told by Content-Length before the body is read.
    let answer = raw(
        &d,
        post.clone(),
        path,
        STAFF_TOKEN,
        Some("application/json"),
        Some(vec![b' '; 10_000_000]),
    )
    .await;
    assert_error(
        &answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        None,
        "",
    );
    // Valid JSON over the limit (1.5 MB against 1 MiB).
    let big = format!("{{\"mobile_phone\":\"{}\"}}", "1".repeat(limit + limit / 2));
    let answer = raw(
        &d,
        post.clone(),
        path,
        STAFF_TOKEN,
        Some("application/json"),
        Some(big.into_bytes()),
    )
    .await;
    assert_error(
        &answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        None,
        "",
    );
    // Not JSON.
    let body = br#"{"mobile_phone":"+12015550123"}"#.to_vec();
    let answer = raw(
        &d,
        post.clone(),
        path,
        STAFF_TOKEN,
        Some("text/plain"),
        Some(body.clone()),
    )
    .await;
    assert_error(
        &answer,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        None,
        "",
    );
    let answer = raw(
        &d,
        post.clone(),
        path,
        STAFF_TOKEN,
        None,
        Some(body.clone()),
    )
    .await;
    assert_error(
        &answer,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        None,
        "",
    );
    // An array is not the object expected.
    let answer = raw(
        &d,
        post.clone(),
        path,
        STAFF_TOKEN,
        Some("application/json"),
        Some(b"[null]".to_vec()),
    )
    .await;
    assert_error(
        &answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
        None,
        "",
    );
    // An empty body, with or without a content type, still starts.
    let (status, _, text) = raw(&d, post.clone(), path, STAFF_TOKEN, None, None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let view: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(view["status"], "pending", "{text}");
    let (status, _, text) = raw(
        &d,
        post.clone(),
        "/v1/staff/patients/pat1/sms/opt-out",
        STAFF_TOKEN,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn nul_and_control_characters_are_refused_naming_the_field() {
    let d = clinic().await;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let json = Some("application/json");
    let put = reqwest::Method::PUT;
    let post = reqwest::Method::POST;
    // A practice's name with NUL (a 500 on PostgreSQL before).
    let mut body = practice_body("p2");
    body["name"] = json!("Clinic\u{0}Zyxecho");
    let answer = raw(
        &d,
        put.clone(),
        "/v1/admin/practices/p2",
        ADMIN_TOKEN,
        json,
        Some(body.to_string().into_bytes()),
    )
    .await;
    assert_error(
        &answer,
        unprocessable,
        "control_character",
        Some("name"),
        "Zyxecho",
    );
    // A patient's first name with NUL, a last name with a newline (names take none).
    let mut body = caremsg_tests::patient_body("p1", &[], &["u1"]);
    body["first_name"] = json!("Pat\u{0}");
    let answer = raw(
        &d,
        put.clone(),
        "/v1/admin/patients/pat1",
        ADMIN_TOKEN,
        json,
        Some(body.to_string().into_bytes()),
    )
    .await;
    assert_error(
        &answer,
        unprocessable,
        "control_character",
        Some("first_name"),
        "",
    );
    body["first_name"] = json!("Pat");
    body["last_name"] = json!("Ex\nample");
    let answer = raw(
        &d,
        put.clone(),
        "/v1/admin/patients/pat1",
        ADMIN_TOKEN,
        json,
        Some(body.to_string().into_bytes()),
    )
    .await;
    assert_error(
        &answer,
        unprocessable,
        "invalid_field",
        Some("last_name"),
        "",
    );
    // A nested field is named by its path.
    let mut body = practice_body("p1");
    body["sms_numbers"][0]["gateway"] = json!("loop\u{7}back");
    let answer = raw(
        &d,
        put.clone(),
        "/v1/admin/practices/p1",
        ADMIN_TOKEN,
        json,
        Some(body.to_string().into_bytes()),
    )
    .await;
    assert_error(
        &answer,
        unprocessable,
        "control_character",
        Some("sms_numbers[0].gateway"),
        "",
    );
    // Staff and portal message bodies: NUL, escape and carriage return refused...
    for text in [
        "Hello\u{0}Zyxecho",
        "Hello\u{1b}[31mZyxecho",
        "Hello\rZyxecho",
    ] {
        let send = json!({"body": text}).to_string().into_bytes();
        let answer = raw(
            &d,
            post.clone(),
            "/v1/staff/patients/pat1/messages",
            STAFF_TOKEN,
            json,
            Some(send.clone()),
        )
        .await;
        assert_error(
            &answer,
            unprocessable,
            "control_character",
            Some("body"),
            "Zyxecho",
        );
        let answer = raw(
            &d,
            post.clone(),
            "/v1/portal/patients/pat1/messages",
            PORTAL_TOKEN,
            json,
            Some(send),
        )
        .await;
        assert_error(
            &answer,
            unprocessable,
            "control_character",
            Some("body"),
            "Zyxecho",
        );
    }
    let send = json!({"body": "ok", "client_txn_id": "t\u{0}1"})
        .to_string()
        .into_bytes();
    let answer = raw(
        &d,
        post.clone(),
        "/v1/portal/patients/pat1/messages",
        PORTAL_TOKEN,
        json,
        Some(send),
    )
    .await;
    assert_error(
        &answer,
        unprocessable,
        "control_character",
        Some("client_txn_id"),
        "",
    );
    // ... newline and tab kept.
    let send = json!({"body": "Line one\n\tLine two"})
        .to_string()
        .into_bytes();
    let (status, _, text) = raw(
        &d,
        post.clone(),
        "/v1/portal/patients/pat1/messages",
        PORTAL_TOKEN,
        json,
        Some(send),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let stored = message::Entity::find()
        .filter(message::Column::PatientId.eq("pat1"))
        .all(&d.daemon().state().db)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].body, "Line one\n\tLine two");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn an_inbound_text_with_nul_is_stored_without_it() {
    let d = clinic().await;
    patient::Entity::update_many()
        .col_expr(patient::Column::SmsStatus, Expr::value(SmsStatus::Enabled))
        .filter(patient::Column::Id.eq("pat1"))
        .exec(&d.daemon().state().db)
        .await
        .unwrap();
    let to = practice_body("p1")["sms_numbers"][0]["number"].clone();
    let text =
        json!({"from": "+12015550123", "to": to, "body": "Thanks\u{0} doctor", "id": "n\u{0}1"});
    for _ in 0..2 {
        let response = d
            .http
            .post(format!("{}/v1/hooks/loopback", d.base))
            .json(&text)
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert_eq!(status, StatusCode::OK, "{}", response.text().await.unwrap());
    }
    let stored = message::Entity::find()
        .filter(message::Column::PatientId.eq("pat1"))
        .all(&d.daemon().state().db)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1, "stored once, the retry recognised");
    assert_eq!(stored[0].body, "Thanks doctor");
    assert_eq!(stored[0].provider_message_id.as_deref(), Some("n1"));
    d.stop().await.unwrap();
}

#[tokio::test]
async fn only_json_objects_and_only_application_json() {
    let d = clinic().await;
    let post = reqwest::Method::POST;
    let put = reqwest::Method::PUT;
    let json = Some("application/json");
    // An array where an object is expected: not a send, not a patient update.
    let answer = raw(
        &d,
        post.clone(),
        "/v1/staff/patients/pat1/messages",
        STAFF_TOKEN,
        json,
        Some(br#"["x","t1"]"#.to_vec()),
    )
    .await;
    assert_error(
        &answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
        None,
        "",
    );
    let patient = caremsg_tests::patient_body("p1", &[], &["u1"]);
    let as_array: Vec<Value> = patient.as_object().unwrap().values().cloned().collect();
    let answer = raw(
        &d,
        put.clone(),
        "/v1/admin/patients/pat1",
        ADMIN_TOKEN,
        json,
        Some(Value::Array(as_array).to_string().into_bytes()),
    )
    .await;
    assert_error(
        &answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
        None,
        "",
    );
    for scalar in ["\"text\"", "12", "null", "true"] {
        let answer = raw(
            &d,
            put.clone(),
            "/v1/staff/settings/notifications",
            STAFF_TOKEN,
            json,
            Some(scalar.as_bytes().to_vec()),
        )
        .await;
        assert_error(
            &answer,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            None,
            "",
        );
    }
    // Only application/json, with or without parameters.
    let send = br#"{"body":"hello"}"#.to_vec();
    for content_type in [
        "application/jsonp",
        "application/json-seq",
        "text/json",
        "application/x-www-form-urlencoded",
    ] {
        let answer = raw(
            &d,
            post.clone(),
            "/v1/staff/patients/pat1/messages",
            STAFF_TOKEN,
            Some(content_type),
            Some(send.clone()),
        )
        .await;
        assert_error(
            &answer,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
            "",
        );
    }
    for content_type in [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
    ] {
        let (status, _, text) = raw(
            &d,
            post.clone(),
            "/v1/staff/patients/pat1/messages",
            STAFF_TOKEN,
            Some(content_type),
            Some(send.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{content_type}: {text}");
    }
    d.stop().await.unwrap();
}
