//! The conformance battery (`caremsg-plugin-testkit`) against the built `.so`, with the
//! suite in `testkit.json`: the send mapping against the battery's fake (2xx sent;
//! 408, 429 and 5xx retryable; other 4xx permanent), and no webhooks (404).

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::path::Path;

use caremsg_plugin_testkit::{Suite, run};
use caremsg_testplugins::library_path;

#[test]
fn portal_webhook_passes_the_battery() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("testkit.json");
    let suite =
        Suite::from_json(&std::fs::read_to_string(file).expect("suite file")).expect("valid suite");
    let library = library_path(env!("CARGO_PKG_NAME")).expect("built");
    let mut out = Vec::new();
    let report = run(&library, &suite, &mut out).expect("the battery runs");
    let out = String::from_utf8(out).expect("UTF-8 output");
    assert_eq!(report.failed(), 0, "{out}");
    for check in [
        "send maps 202 with an id as sent",
        "send maps 401 as permanent",
        "webhook no webhooks (404)",
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
}
