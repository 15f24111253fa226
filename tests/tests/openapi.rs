//! The OpenAPI document is the truth (issue #14, item 14): its operations are the
//! router's routes, both ways; every staff operation declares `X-Caremsg-User`; the
//! error answers, limits, event streams and webhook content types are stated.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::collections::BTreeSet;
use std::path::Path;

use caremsg_tests::TestDaemon;
use reqwest::{Method, StatusCode};
use serde_json::Value;

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch"];

/// The `(method, path)` pairs the router serves, read from the `.route(...)` calls of
/// `daemon/src/api/*.rs` (a route taking any method is a webhook: POST).
fn router_routes() -> BTreeSet<(String, String)> {
    let api = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/src/api");
    let mut routes = BTreeSet::new();
    for entry in std::fs::read_dir(&api).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let source: String = std::fs::read_to_string(&path)
            .unwrap()
            .split_whitespace()
            .collect();
        for call in source.split(".route(").skip(1) {
            let Some(rest) = call.strip_prefix('"') else {
                continue;
            };
            let (route, handlers) = rest.split_once('"').unwrap();
            // The handlers up to the call's closing parenthesis.
            let mut depth = 1;
            let end = handlers
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(handlers.len(), |(i, _)| i);
            let handlers = &handlers[..end];
            for method in METHODS.iter().chain(&["any"]) {
                let called = handlers.starts_with(&format!(",{method}("))
                    || handlers.contains(&format!(".{method}("));
                if called {
                    let method = if *method == "any" { "post" } else { method };
                    routes.insert((method.to_owned(), route.to_owned()));
                }
            }
        }
    }
    assert!(
        routes.len() > 20,
        "the route scan found too little: {routes:?}"
    );
    routes
}

fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            if let Some(operation) = item.get(*method) {
                out.push(((*method).to_owned(), path.clone(), operation));
            }
        }
    }
    out
}

async fn document(d: &TestDaemon) -> Value {
    let (status, doc) = d.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    doc
}

#[tokio::test]
async fn the_document_lists_exactly_the_routes_the_router_serves() {
    let d = TestDaemon::start().await.unwrap();
    let doc = document(&d).await;
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect();
    let served = router_routes();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the document: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented operations no route serves: {unserved:?}"
    );
    assert!(documented.contains(&("get".to_owned(), "/v1/openapi.json".to_owned())));
    // And the server agrees: every documented operation reaches a handler (no
    // fallback 404 "No such path", no 405).
    for (method, path) in &documented {
        let concrete = path
            .split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    "x"
                } else {
                    segment
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let response = d
            .http
            .request(method.clone(), format!("{}{}", d.base, concrete))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {text}"
        );
        assert!(
            !(status == StatusCode::NOT_FOUND && text.contains("No such path")),
            "{method} {path} reaches no handler"
        );
    }
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_document_states_credentials_errors_limits_and_streams() {
    let d = TestDaemon::start().await.unwrap();
    let doc = document(&d).await;
    for (method, path, operation) in operations(&doc) {
        let params = operation["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let responses = operation["responses"].as_object().unwrap();
        let has = |status: &str| responses.contains_key(status);
        let authenticated = ["/v1/staff/", "/v1/admin/", "/v1/portal/"]
            .iter()
            .any(|p| path.starts_with(p));
        if path.starts_with("/v1/staff/") {
            let header = params
                .iter()
                .find(|p| p["name"] == "X-Caremsg-User")
                .unwrap_or_else(|| panic!("{method} {path} does not declare X-Caremsg-User"));
            assert_eq!(header["in"], "header");
            assert_eq!(header["required"], true);
            assert!(has("400"), "{method} {path}: 400 missing_user");
        }
        if authenticated {
            for status in ["401", "403", "503"] {
                assert!(has(status), "{method} {path} lacks {status}");
            }
            assert!(
                operation["security"]
                    .as_array()
                    .is_some_and(|s| !s.is_empty()),
                "{method} {path} names no security scheme"
            );
        }
        if path.contains('{') {
            assert!(
                has("400") && has("404"),
                "{method} {path}: 400/404 for a path id"
            );
        }
        if operation.get("requestBody").is_some() && authenticated {
            for status in ["400", "413", "415", "422"] {
                assert!(has(status), "{method} {path} lacks {status}");
            }
        }
        for param in &params {
            if param["in"] == "query" {
                assert!(
                    has("400") && has("422"),
                    "{method} {path}: 400/422 for a query"
                );
            }
            match param["name"].as_str().unwrap() {
                "limit" => {
                    assert_eq!(param["schema"]["minimum"], 1, "{method} {path} limit");
                    assert_eq!(param["schema"]["maximum"], 200, "{method} {path} limit");
                }
                "before" => assert_eq!(param["schema"]["minimum"], 1, "{method} {path} before"),
                "q" => {
                    assert_eq!(param["schema"]["minLength"], 1);
                    assert_eq!(param["schema"]["maxLength"], 100);
                }
                _ => {}
            }
            if param["in"] == "path" {
                assert_eq!(param["schema"]["minLength"], 1, "{method} {path}");
            }
        }
        if path.ends_with("/events") {
            let content = &responses["200"]["content"];
            assert!(
                content.get("text/event-stream").is_some(),
                "{method} {path} does not declare text/event-stream: {content}"
            );
            assert!(content["text/event-stream"].get("schema").is_some());
        }
    }
    // The webhook takes JSON and forms.
    let hook = &doc["paths"]["/v1/hooks/{gateway_instance}"]["post"]["requestBody"]["content"];
    assert!(hook.get("application/json").is_some(), "{hook}");
    assert!(
        hook.get("application/x-www-form-urlencoded").is_some(),
        "{hook}"
    );
    // Bodies state their limits.
    let schemas = &doc["components"]["schemas"];
    let send = &schemas["SendIn"]["properties"]["body"];
    assert_eq!(send["minLength"], 1, "{send}");
    assert!(send["pattern"].is_string(), "{send}");
    let practice = &schemas["PracticeIn"]["properties"];
    assert!(
        practice["country"]["enum"]
            .as_array()
            .unwrap()
            .contains(&Value::from("US"))
    );
    assert!(
        practice["timezone"]["enum"]
            .as_array()
            .unwrap()
            .contains(&Value::from("America/New_York"))
    );
    assert_eq!(
        schemas["PatientIn"]["properties"]["date_of_birth"]["format"],
        "date"
    );
    assert_eq!(
        schemas["PatientIn"]["properties"]["first_name"]["minLength"],
        1
    );
    d.stop().await.unwrap();
}
