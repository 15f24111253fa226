//! Runs the battery (library and binary) against the real plugin libraries: the
//! first-party and the working test plugins pass; broken ones fail the right checks
//! without taking the battery down.

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::path::{Path, PathBuf};
use std::process::Command;

use caremsg_plugin_testkit::{Report, Suite, run};
use caremsg_testplugins::{
    BROKEN_PANICS, HTTP_STATUS, PANIC_ABORT, SMS_LOOPBACK, WRONG_ABI, library_path,
};

fn plugins_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn suite_file(relative: &str) -> PathBuf {
    plugins_dir().join(relative)
}

fn battery(package: &str, suite: &Suite) -> (Report, String) {
    let mut out = Vec::new();
    let report =
        run(&library_path(package).expect("built"), suite, &mut out).expect("the battery runs");
    (report, String::from_utf8(out).expect("UTF-8 output"))
}

fn suite(relative: &str) -> Suite {
    Suite::from_json(&std::fs::read_to_string(suite_file(relative)).expect("suite file"))
        .expect("valid suite")
}

#[test]
fn sms_loopback_passes() {
    let (report, out) = battery(SMS_LOOPBACK, &suite("sms-loopback/testkit.json"));
    assert_eq!(report.failed(), 0, "{out}");
    assert!(report.passed() >= 15, "{out}");
    assert_eq!(out.lines().last(), Some(report.summary().as_str()));
    assert!(
        report
            .check("200 concurrent sends")
            .is_some_and(|c| c.passed),
        "{out}"
    );
    assert!(
        report
            .check("emit back-pressure")
            .is_some_and(|c| c.detail.contains("503")),
        "{out}"
    );
}

#[test]
fn send_mapping_goes_through_the_hosts_http_service_to_the_fake() {
    let (report, out) = battery(HTTP_STATUS, &suite("testplugins/http-status/testkit.json"));
    assert_eq!(report.failed(), 0, "{out}");
    let sent = report.check("send maps 201 as sent").expect("ran");
    assert!(
        sent.detail.contains("PROV-") && sent.detail.contains("1 request(s) to the fake"),
        "{out}"
    );
}

#[test]
fn a_wrong_expectation_is_reported_as_a_failure() {
    let mut suite = suite("testplugins/http-status/testkit.json");
    suite.send[1].code = Some("20429".to_owned());
    suite.concurrent_sends = 4;
    let (report, out) = battery(HTTP_STATUS, &suite);
    assert_eq!(report.failed(), 1, "{out}");
    assert!(
        report.check("send maps 429").is_some_and(|c| !c.passed),
        "{out}"
    );
}

#[test]
fn panicking_plugin_fails_but_is_contained() {
    let suite = Suite::for_config(serde_json::json!({}));
    let (report, out) = battery(BROKEN_PANICS, &suite);
    for (check, passed) in [
        ("handshake", true),
        ("wrong ABI major refused", true),
        ("bad config is a clean start error", true),
        ("send maps accepted", false),
        ("200 concurrent sends", false),
        ("adversarial inputs", false),
        ("panic containment", true),
        ("no emit after stop", true),
    ] {
        let found = report
            .check(check)
            .unwrap_or_else(|| panic!("{check} ran: {out}"));
        assert_eq!(found.passed, passed, "{check}: {out}");
    }
    assert!(
        report
            .check("send maps accepted")
            .is_some_and(|c| c.detail.contains("panicked")),
        "{out}"
    );
}

#[test]
fn refused_plugins_fail_the_handshake() {
    for (package, fragment) in [(WRONG_ABI, "ABI 2.1"), (PANIC_ABORT, "panic=abort")] {
        let (report, out) = battery(package, &Suite::for_config(serde_json::json!({})));
        assert_eq!((report.passed(), report.failed()), (0, 1), "{out}");
        assert!(
            report
                .check("handshake")
                .is_some_and(|c| c.detail.contains(fragment)),
            "{out}"
        );
    }
}

#[test]
fn the_binary_prints_the_summary_and_sets_the_exit_code() {
    let binary = env!("CARGO_BIN_EXE_caremsg-plugin-testkit");
    let good = Command::new(binary)
        .arg(library_path(SMS_LOOPBACK).expect("built"))
        .arg("--config")
        .arg(suite_file("sms-loopback/testkit.json"))
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{stdout}");
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l.ends_with(" passed, 0 failed")),
        "{stdout}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bare.json");
    std::fs::write(&config, "{}").expect("write");
    let bad = Command::new(binary)
        .arg(library_path(BROKEN_PANICS).expect("built"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success(), "{stdout}");
    assert!(stdout.contains("FAIL send maps accepted"), "{stdout}");
}

#[test]
fn the_plugin_template_passes_its_own_suite() {
    let (report, out) = battery("caremsg-plugin-template", &suite("template/testkit.json"));
    assert_eq!(report.failed(), 0, "{out}");
    assert!(
        report
            .check("send maps 200 as sent")
            .is_some_and(|c| c.detail.contains("request as expected")),
        "{out}"
    );
}

#[test]
fn back_pressure_is_not_passed_by_a_refusal_for_another_reason() {
    // The false pass of issue 16: a stale signature answers 403, which the old check
    // took for back-pressure. The case must first succeed without back-pressure.
    let mut suite = suite("template/testkit.json");
    suite.webhooks[0].timestamp = "${NOW-600}".to_owned();
    suite.concurrent_sends = 4;
    let (report, out) = battery("caremsg-plugin-template", &suite);
    let check = report.check("emit back-pressure").expect("ran");
    assert!(!check.passed, "{out}");
    assert!(
        check.detail.contains("answered 403") && check.detail.contains("without back-pressure"),
        "{out}"
    );
}
