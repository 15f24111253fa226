//! The conformance battery (`caremsg-plugin-testkit`) against the built `.so`, with the
//! committed suite in `testkit.json`: Telnyx-shaped answers from the battery's fake
//! (and the request checked field by field), and webhooks signed with Ed25519 at the
//! moment they run, so the suite passes at any time of day.

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::path::Path;

use caremsg_plugin_testkit::{Suite, run};
use caremsg_testplugins::library_path;

#[test]
fn sms_telnyx_passes_the_battery() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("testkit.json");
    let suite =
        Suite::from_json(&std::fs::read_to_string(file).expect("suite file")).expect("valid suite");
    let library = library_path(env!("CARGO_PKG_NAME")).expect("built");
    let mut out = Vec::new();
    let report = run(&library, &suite, &mut out).expect("the battery runs");
    let out = String::from_utf8(out).expect("UTF-8 output");
    assert_eq!(report.failed(), 0, "{out}");
    for check in [
        "send maps 200 as sent",
        "send maps 40300 as unsubscribed",
        "webhook signed inbound text",
        "webhook signed 10 minutes ago refused",
        "webhook signed with another key refused",
        "200 concurrent sends",
        "emit back-pressure",
        "logs hold no PHI",
        "no emit after stop",
    ] {
        assert!(
            report.check(check).is_some_and(|c| c.passed),
            "{check}: {out}"
        );
    }
    let sent = report.check("send maps 200 as sent").unwrap();
    assert!(sent.detail.contains("request as expected"), "{out}");
    let pressure = report.check("emit back-pressure").unwrap();
    assert!(
        pressure
            .detail
            .contains("answered 200 without back-pressure, then 503"),
        "{out}"
    );
}
