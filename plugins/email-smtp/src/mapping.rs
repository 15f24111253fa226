//! How an SMTP failure becomes a [`SendResult`].
//!
//! | failure | result |
//! | --- | --- |
//! | a 4xx reply (`451`, `452`, `421`, ...) | retryable, code = the reply code |
//! | a 5xx reply (`550`, `553`, `554`, ...) | permanent, code = the reply code |
//! | `530`/`534`/`535` (authentication) | permanent, and `health` reports the refusal |
//! | timeout | retryable, code `timeout` |
//! | TLS failure (handshake, certificate) | retryable, code `tls` (a configuration problem: see the reason) |
//! | no connection, a broken connection, a malformed reply | retryable, code `connection` |
//!
//! Servers quote the recipient in their replies (`550 5.1.1 <pat@example.org>: User
//! unknown`), so the reply text goes through [`redact::scrub`] before it becomes a
//! reason.

use std::error::Error as _;

use caremsg_plugin_sdk::{SendResult, redact};
use lettre::transport::smtp::Error;

/// How much of the server's text a reason keeps.
const MAX_TEXT: usize = 200;

/// Reply codes that mean "your credentials were refused".
pub const AUTH_REFUSED: [&str; 3] = ["530", "534", "535"];

/// The server's text (the error's sources), scrubbed.
fn server_text(error: &Error) -> String {
    let mut parts = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    redact::scrub(&parts.join(": "), MAX_TEXT)
}

/// Maps a failed send.
pub fn map_error(error: &Error) -> SendResult {
    let text = server_text(error);
    let with_text = |what: String| {
        if text.is_empty() {
            format!("{what}.")
        } else {
            format!("{what}: {text}")
        }
    };
    if let Some(code) = error.status() {
        let code = code.to_string();
        if error.is_transient() {
            return SendResult::Retryable {
                after: None,
                code: Some(code.clone()),
                reason: with_text(format!("The SMTP server answered {code} (temporary)")),
            };
        }
        if error.is_permanent() {
            return SendResult::Permanent {
                reason: with_text(format!("The SMTP server answered {code} (permanent)")),
                code,
            };
        }
    }
    // lettre reports a failed TLS handshake (an untrusted or mismatched certificate)
    // as a connection error wrapping the TLS library's; its text says which.
    let tls_failure = text.to_ascii_lowercase().contains("certificate")
        || text.to_ascii_lowercase().contains("handshake");
    let (code, what) = if error.is_timeout() {
        ("timeout", "The SMTP server did not answer in time")
    } else if error.is_tls() || tls_failure {
        ("tls", "TLS with the SMTP server failed")
    } else {
        ("connection", "The SMTP exchange failed")
    };
    SendResult::Retryable {
        after: None,
        code: Some(code.to_owned()),
        reason: with_text(what.to_owned()),
    }
}
