//! Loads the real plugin libraries Cargo built: sms-loopback works end to end; the
//! wrong-ABI and panic=abort plugins are refused with messages naming the file; the
//! panicking plugin's panics are contained.

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use caremsg_plugin_host::{
    CallError, EmitOutcome, Event, HostServices, HttpRequest, HttpResponse, Kind, Level, LoadError,
    Outbound, SendOutcome, StartError, WebhookRequest, inspect, load,
};
use caremsg_testplugins::{BROKEN_PANICS, PANIC_ABORT, SMS_LOOPBACK, WRONG_ABI, library_path};

/// Records what plugins ask of the host.
#[derive(Default)]
struct Recorder {
    logs: Mutex<Vec<(Level, String)>>,
    events: Mutex<Vec<Event>>,
}

impl HostServices for Recorder {
    fn emit(&self, _instance: &str, event: Event) -> EmitOutcome {
        self.events.lock().unwrap().push(event);
        EmitOutcome::Accepted
    }
    fn log(&self, _instance: &str, level: Level, message: &str) {
        self.logs.lock().unwrap().push((level, message.to_owned()));
    }
    fn http(&self, _instance: &str, _request: HttpRequest) -> Result<HttpResponse, String> {
        Err("no HTTP in this test".to_owned())
    }
}

fn path(package: &str) -> PathBuf {
    library_path(package).expect("the plugin library was built")
}

fn outbound(body: &str) -> Outbound {
    Outbound {
        delivery_id: "d-1".into(),
        to: "+15550100".into(),
        from: "+15550199".into(),
        body: body.into(),
        idempotency_key: "k-1".into(),
        subject: None,
        attempt: 1,
    }
}

fn hook(remote: &str, body: &str) -> WebhookRequest {
    WebhookRequest {
        method: "POST".into(),
        public_url: "http://127.0.0.1:8080/v1/hooks/loopback".into(),
        remote_addr: Some(remote.parse().expect("address")),
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: body.as_bytes().to_vec(),
    }
}

#[test]
fn sms_loopback_sends_receives_and_stops() {
    let plugin = load(&path(SMS_LOOPBACK)).expect("sms-loopback loads");
    assert_eq!(plugin.name(), "sms-loopback");
    assert_eq!(plugin.kind(), Kind::Sms);
    assert!(plugin.metadata().built_with_unwind);
    assert!(
        !plugin.entry_accepts(2, 0),
        "a v1 plugin must refuse host ABI 2"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = dir.path().join("state/outbox.jsonl");
    let config = serde_json::json!({ "outbox": outbox }).to_string();
    let recorder = Arc::new(Recorder::default());
    let instance = plugin
        .start("loopback", &config, recorder.clone())
        .expect("starts");

    let outcome = instance
        .send(&outbound("Your code is 123456 €"))
        .expect("send works");
    let SendOutcome::Sent { provider_id } = outcome else {
        panic!("expected Sent, got {outcome:?}")
    };
    let text = std::fs::read_to_string(&outbox).expect("outbox written");
    let line: serde_json::Value = serde_json::from_str(text.trim_end()).expect("one JSON line");
    assert_eq!(line["id"], provider_id.as_str());
    assert_eq!(line["to"], "+15550100");
    assert_eq!(line["body"], "Your code is 123456 €");
    assert_eq!(line["segments"], 1);
    let logs = recorder.logs.lock().unwrap().clone();
    assert!(
        logs.iter().any(|(_, m)| m.contains(&provider_id)),
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .all(|(_, m)| !m.contains("1555") && !m.contains("123456")),
        "PHI in logs: {logs:?}"
    );

    let outcome = instance
        .handle_webhook(&hook(
            "127.0.0.1:50000",
            r#"{"from":"+15550100","to":"+15550199","body":"YES","id":"r1"}"#,
        ))
        .expect("webhook works");
    assert_eq!(outcome.response.status, 200);
    assert_eq!(
        outcome.events,
        vec![Event::InboundMessage {
            from: "+15550100".into(),
            to: "+15550199".into(),
            body: "YES".into(),
            provider_message_id: "r1".into(),
        }]
    );
    assert!(
        recorder.events.lock().unwrap().is_empty(),
        "webhook events go back with the response, not to emit"
    );

    let outcome = instance
        .handle_webhook(&hook(
            "192.0.2.7:50000",
            r#"{"from":"a","to":"b","body":"c"}"#,
        ))
        .expect("webhook");
    assert_eq!((outcome.response.status, outcome.events.len()), (403, 0));

    instance.set_webhook_event_limit(0);
    let outcome = instance
        .handle_webhook(&hook("[::1]:50000", r#"{"from":"a","to":"b","body":"c"}"#))
        .expect("webhook");
    assert_eq!(
        (outcome.response.status, outcome.events.len()),
        (503, 0),
        "busy host → provider retries"
    );

    instance.stop().expect("stops");
    assert_eq!(instance.send(&outbound("x")), Err(CallError::Stopped));
    assert_eq!(instance.stop(), Err(CallError::Stopped));
    assert_eq!(instance.calls_after_stop(), 0);
}

#[test]
fn bad_config_is_a_clean_start_error() {
    let plugin = load(&path(SMS_LOOPBACK)).expect("loads");
    let error = plugin
        .start("loopback", "not json", Arc::new(Recorder::default()))
        .expect_err("refused");
    let StartError::Refused(message) = error else {
        panic!("expected a refusal, got {error:?}")
    };
    assert!(message.contains("configuration is invalid"), "{message}");
}

#[test]
fn wrong_abi_major_is_refused_naming_file_and_versions() {
    let file = path(WRONG_ABI);
    let error = load(&file).expect_err("refused");
    assert!(
        matches!(
            error,
            LoadError::AbiMajor {
                plugin_major: 2,
                host_major: 1,
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains(&file.display().to_string()), "{message}");
    assert!(
        message.contains("ABI 2.1") && message.contains("ABI 1.1"),
        "{message}"
    );

    let metadata = inspect(&file).expect("inspectable");
    assert_eq!((metadata.abi_major, metadata.is_loadable()), (2, false));
    assert!(metadata.to_string().contains("loadable: no"), "{metadata}");
}

#[test]
fn panic_abort_build_is_refused_naming_file() {
    let file = path(PANIC_ABORT);
    let error = load(&file).expect_err("refused");
    assert!(matches!(error, LoadError::PanicAbort { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains(&file.display().to_string()) && message.contains("panic=abort"),
        "{message}"
    );
    assert!(!inspect(&file).expect("inspectable").built_with_unwind);
}

#[test]
fn panics_are_contained_and_their_messages_withheld() {
    let plugin = load(&path(BROKEN_PANICS)).expect("loads");
    let recorder = Arc::new(Recorder::default());
    let instance = plugin
        .start("broken", "{}", recorder.clone())
        .expect("starts");
    for _ in 0..3 {
        assert_eq!(
            instance.send(&outbound("secret")),
            Err(CallError::Panicked { call: "send" })
        );
    }
    let error = instance
        .handle_webhook(&hook("127.0.0.1:1", "{}"))
        .expect_err("panics");
    assert_eq!(
        error,
        CallError::Panicked {
            call: "handle_webhook"
        }
    );
    assert!(
        instance.health().is_ok(),
        "the instance still answers after panics"
    );
    let logs = recorder.logs.lock().unwrap().clone();
    assert!(
        logs.iter()
            .any(|(level, m)| *level == Level::Error && m.contains("panicked in send at")),
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .all(|(_, m)| !m.contains("1555") && !m.contains("secret")),
        "{logs:?}"
    );
    instance.stop().expect("stops");
}

#[test]
fn a_file_that_is_not_a_library_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("libnot_a_plugin.so");
    std::fs::write(&file, b"not an ELF file").expect("write");
    let error = load(&file).expect_err("refused");
    assert!(matches!(error, LoadError::Open { .. }), "{error:?}");
    assert!(error.to_string().contains("libnot_a_plugin.so"), "{error}");
}

#[test]
fn handles_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<caremsg_plugin_host::Plugin>();
    assert_send_sync::<caremsg_plugin_host::Instance>();
    assert_send_sync::<caremsg_plugin_host::HyperHttp>();
    let instance = load(&path(SMS_LOOPBACK))
        .expect("loads")
        .start(
            "shared",
            &serde_json::json!({ "outbox": tempfile::tempdir().expect("tempdir").path().join("o.jsonl") }).to_string(),
            Arc::new(Recorder::default()),
        )
        .expect("starts");
    let instance = Arc::new(instance);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let instance = instance.clone();
            std::thread::spawn(move || instance.health())
        })
        .collect();
    for thread in threads {
        assert!(thread.join().expect("joined").is_ok());
    }
}
