//! Admin sync through the real HTTP server: upserts, validation that names the field
//! (one case per rule), deletes, reactivation and the audit log.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use caremsg_tests::{ADMIN_TOKEN, STAFF_TOKEN, TestDaemon, patient_body, practice_body};
use caremsgd::clock::Clock;
use reqwest::{Method, StatusCode};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};

/// One validation case: a request that must be refused with this status, code and field.
struct Case {
    name: &'static str,
    path: &'static str,
    body: Value,
    status: StatusCode,
    field: Option<&'static str>,
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

fn patient(key: &str, value: Value) -> Value {
    with(patient_body("p1", &["ccm"], &["u1"]), key, value)
}

#[tokio::test]
async fn every_admin_rule_refuses_bad_input_naming_the_field() {
    let d = TestDaemon::start().await.unwrap();
    d.practice("p1").await;
    d.practice("p2").await;
    d.program("p1", "ccm").await;
    d.program("p2", "rpm").await;
    d.user("p1", "u1", &[]).await;
    d.user("p2", "u2", &[]).await;
    d.patient("p1", "pat1", &["ccm"], &["u1"]).await;

    let future = (d.clock.now().date_naive() + chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let cases = vec![
        Case {
            name: "practice name empty",
            path: "/v1/admin/practices/p9",
            body: with(practice_body("p9"), "name", json!("  ")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("name"),
        },
        Case {
            name: "practice country unknown",
            path: "/v1/admin/practices/p9",
            body: with(practice_body("p9"), "country", json!("XX")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("country"),
        },
        Case {
            name: "practice timezone unknown",
            path: "/v1/admin/practices/p9",
            body: with(practice_body("p9"), "timezone", json!("Mars/Olympus")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("timezone"),
        },
        Case {
            name: "practice number invalid",
            path: "/v1/admin/practices/p9",
            body: with(
                practice_body("p9"),
                "sms_numbers",
                json!([{"number": "123", "gateway": "loopback"}]),
            ),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("sms_numbers[0].number"),
        },
        Case {
            name: "practice gateway unknown",
            path: "/v1/admin/practices/p9",
            body: with(
                practice_body("p9"),
                "sms_numbers",
                json!([{"number": "+12015550188", "gateway": "nope"}]),
            ),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("sms_numbers[0].gateway"),
        },
        Case {
            name: "practice number of another practice",
            path: "/v1/admin/practices/p9",
            body: practice_body("p1"),
            status: StatusCode::CONFLICT,
            field: Some("sms_numbers[0].number"),
        },
        Case {
            name: "practice missing field",
            path: "/v1/admin/practices/p9",
            body: json!({"name": "x"}),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("sms_enabled"),
        },
        Case {
            name: "practice unknown field",
            path: "/v1/admin/practices/p9",
            body: with(practice_body("p9"), "colour", json!("red")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("colour"),
        },
        Case {
            name: "practice mistyped field",
            path: "/v1/admin/practices/p9",
            body: with(practice_body("p9"), "sms_enabled", json!("yes")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("sms_enabled"),
        },
        Case {
            name: "program under unknown practice",
            path: "/v1/admin/practices/nope/programs/x",
            body: json!({"name": "CCM"}),
            status: StatusCode::NOT_FOUND,
            field: None,
        },
        Case {
            name: "program moved between practices",
            path: "/v1/admin/practices/p2/programs/ccm",
            body: json!({"name": "CCM"}),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("practice_id"),
        },
        Case {
            name: "program name empty",
            path: "/v1/admin/practices/p1/programs/x",
            body: json!({"name": ""}),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("name"),
        },
        Case {
            name: "user unknown practice",
            path: "/v1/admin/users/u9",
            body: json!({"practice_id": "nope", "name": "A", "restricted_programs": []}),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("practice_id"),
        },
        Case {
            name: "user bad email",
            path: "/v1/admin/users/u9",
            body: json!({"practice_id": "p1", "name": "A", "email": "not an email", "restricted_programs": []}),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("email"),
        },
        Case {
            name: "user unknown program",
            path: "/v1/admin/users/u9",
            body: json!({"practice_id": "p1", "name": "A", "restricted_programs": ["nope"]}),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("restricted_programs"),
        },
        Case {
            name: "user program of another practice",
            path: "/v1/admin/users/u9",
            body: json!({"practice_id": "p1", "name": "A", "restricted_programs": ["rpm"]}),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("restricted_programs"),
        },
        Case {
            name: "user moved between practices",
            path: "/v1/admin/users/u1",
            body: json!({"practice_id": "p2", "name": "A", "restricted_programs": []}),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("practice_id"),
        },
        Case {
            name: "patient unknown practice",
            path: "/v1/admin/patients/x",
            body: patient("practice_id", json!("nope")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("practice_id"),
        },
        Case {
            name: "patient moved between practices",
            path: "/v1/admin/patients/pat1",
            body: with(patient_body("p2", &[], &[]), "practice_id", json!("p2")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("practice_id"),
        },
        Case {
            name: "patient first name empty",
            path: "/v1/admin/patients/x",
            body: patient("first_name", json!("")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("first_name"),
        },
        Case {
            name: "patient last name empty",
            path: "/v1/admin/patients/x",
            body: patient("last_name", json!(" ")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("last_name"),
        },
        Case {
            name: "patient date impossible",
            path: "/v1/admin/patients/x",
            body: patient("date_of_birth", json!("1950-02-30")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("date_of_birth"),
        },
        Case {
            name: "patient date malformed",
            path: "/v1/admin/patients/x",
            body: patient("date_of_birth", json!("04/07/1950")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("date_of_birth"),
        },
        Case {
            name: "patient date in the future",
            path: "/v1/admin/patients/x",
            body: patient("date_of_birth", json!(future)),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("date_of_birth"),
        },
        Case {
            name: "patient phone invalid",
            path: "/v1/admin/patients/x",
            body: patient("mobile_phone", json!("555")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("mobile_phone"),
        },
        Case {
            name: "patient phone is a toll-free line",
            path: "/v1/admin/patients/x",
            body: patient("mobile_phone", json!("1-800-555-0199")),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("mobile_phone"),
        },
        Case {
            name: "patient unknown program",
            path: "/v1/admin/patients/x",
            body: patient("programs", json!(["nope"])),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("programs"),
        },
        Case {
            name: "patient program of another practice",
            path: "/v1/admin/patients/x",
            body: patient("programs", json!(["rpm"])),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("programs"),
        },
        Case {
            name: "patient care team unknown user",
            path: "/v1/admin/patients/x",
            body: patient("care_team", json!(["nobody"])),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("care_team"),
        },
        Case {
            name: "patient care team user of another practice",
            path: "/v1/admin/patients/x",
            body: patient("care_team", json!(["u2"])),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some("care_team"),
        },
    ];
    let before = audit_rows(&d).await;
    for case in cases {
        let (status, body) = d.admin_put(case.path, case.body.clone()).await;
        assert_eq!(status, case.status, "{}: {body}", case.name);
        assert!(body["error"]["code"].is_string(), "{}: {body}", case.name);
        assert!(
            body["error"]["message"].is_string(),
            "{}: {body}",
            case.name
        );
        assert_eq!(
            body["error"]["field"].as_str(),
            case.field,
            "{}: {body}",
            case.name
        );
    }
    assert_eq!(
        audit_rows(&d).await,
        before,
        "a refused request changes nothing"
    );
    let patients = caremsg_entities::patient::Entity::find()
        .count(&d.daemon().state().db)
        .await
        .unwrap();
    assert_eq!(patients, 1, "no refused patient was stored");
    d.stop().await.unwrap();
}

async fn audit_rows(d: &TestDaemon) -> u64 {
    caremsg_entities::audit_log::Entity::find()
        .count(&d.daemon().state().db)
        .await
        .unwrap()
}

#[tokio::test]
async fn upserts_normalise_and_deletes_deactivate_with_history_kept() {
    let d = TestDaemon::start().await.unwrap();
    d.practice("p1").await;
    d.program("p1", "ccm").await;
    d.user("p1", "u1", &["ccm"]).await;
    let (status, body) = d
        .admin_put(
            "/v1/admin/patients/pat1",
            patient_body("p1", &["ccm"], &["u1"]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["mobile_phone"], "+12015550123", "stored as E.164");
    assert_eq!(body["sms_status"], "none");

    // The same PUT again keeps the links it names (a unit's deletes and inserts are
    // never reordered by the writer's batching).
    let (status, _) = d
        .admin_put(
            "/v1/admin/patients/pat1",
            patient_body("p1", &["ccm"], &["u1"]),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    d.user("p1", "u1", &["ccm"]).await;
    let db = &d.daemon().state().db;
    let programs = caremsg_entities::patient_program::Entity::find()
        .count(db)
        .await
        .unwrap();
    let restrictions = caremsg_entities::user_program_restriction::Entity::find()
        .count(db)
        .await
        .unwrap();
    let members = caremsg_entities::care_team_member::Entity::find()
        .count(db)
        .await
        .unwrap();
    assert_eq!((programs, restrictions, members), (1, 1, 1));

    // Upsert again: same id, changed fields, no duplicate.
    let mut changed = patient_body("p1", &[], &[]);
    changed["last_name"] = json!("Changed");
    changed["mobile_phone"] = json!("+1 201 555 0124");
    let (status, body) = d.admin_put("/v1/admin/patients/pat1", changed).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["mobile_phone"], "+12015550124");
    assert_eq!(body["care_team"], json!([]));

    // Delete: 204, then 404 for a second delete and for unknown ids.
    let (status, _) = d
        .call(
            Method::DELETE,
            "/v1/admin/patients/pat1",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = d
        .call(
            Method::DELETE,
            "/v1/admin/patients/pat1",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    for path in [
        "/v1/admin/patients/nope",
        "/v1/admin/users/nope",
        "/v1/admin/practices/nope",
    ] {
        let (status, _) = d.call(Method::DELETE, path, Some(ADMIN_TOKEN), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let db = &d.daemon().state().db;
    let stored = caremsg_entities::patient::Entity::find_by_id("pat1")
        .one(db)
        .await
        .unwrap()
        .unwrap();
    assert!(
        !stored.active,
        "deleted patients are deactivated, not removed"
    );
    let audit = caremsg_entities::audit_log::Entity::find()
        .filter(caremsg_entities::audit_log::Column::PatientId.eq("pat1"))
        .count(db)
        .await
        .unwrap();
    assert_eq!(
        audit, 4,
        "three upserts and a delete, kept after the delete"
    );

    // Re-PUT reactivates.
    let (status, _) = d
        .admin_put("/v1/admin/patients/pat1", patient_body("p1", &[], &["u1"]))
        .await;
    assert_eq!(status, StatusCode::OK);
    let stored = caremsg_entities::patient::Entity::find_by_id("pat1")
        .one(db)
        .await
        .unwrap()
        .unwrap();
    assert!(stored.active);

    // Deleting a user, then a practice.
    let (status, _) = d
        .call(
            Method::DELETE,
            "/v1/admin/users/u1",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = d
        .call(
            Method::DELETE,
            "/v1/admin/practices/p1",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = d
        .admin_put(
            "/v1/admin/practices/p1/programs/rpm",
            json!({"name": "RPM"}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a path under a deleted practice: {body}"
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn tokens_and_scopes() {
    let d = TestDaemon::start().await.unwrap();
    let path = "/v1/admin/practices/p1";
    let body = practice_body("p1");
    let (status, err) = d.call(Method::PUT, path, None, Some(&body)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "missing token");
    assert_eq!(err["error"]["code"], "unauthorized");
    let (status, _) = d
        .call(Method::PUT, path, Some("not-a-token"), Some(&body))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "unknown token");
    let (status, err) = d
        .call(Method::PUT, path, Some(STAFF_TOKEN), Some(&body))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "wrong scope");
    assert_eq!(err["error"]["code"], "wrong_scope");
    let (status, _) = d
        .call(Method::PUT, path, Some(ADMIN_TOKEN), Some(&body))
        .await;
    assert_eq!(status, StatusCode::OK);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let d = TestDaemon::start().await.unwrap();
    let url = format!("{}/v1/admin/practices/p1", d.base);
    let send = |body: &'static str, content_type: &'static str| {
        d.http
            .put(&url)
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let r = send("{not json", "application/json").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_json"
    );
    let r = send("{}", "text/plain").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big = "x".repeat(2 * 1024 * 1024);
    let r = d
        .http
        .put(&url)
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "body_too_large"
    );
    let (status, body) = d
        .call(Method::GET, "/v1/nowhere", Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/admin/practices/p1",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"]["code"], "method_not_allowed");
    d.stop().await.unwrap();
}
