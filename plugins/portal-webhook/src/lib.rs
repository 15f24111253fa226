//! `portal-webhook`: pushes conversation events ("a new message for patient X") to
//! the portal backend, as signed JSON, through the daemon's HTTP service.
//!
//! # The request
//! `POST {url}` with `content-type: application/json` and
//! - `X-Caremsg-Timestamp`: Unix seconds when the request was signed;
//! - `X-Caremsg-Signature`: `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">` keyed
//!   with `secret` ([`signature`] has the details and a `verify` for the receiver);
//! - `Idempotency-Key`: the daemon's key, the same on every retry of one delivery, so
//!   the portal can drop a push it already has (a retry after a lost answer);
//! - `X-Caremsg-Delivery`: the daemon's delivery id.
//!
//! The body is one JSON object ([`payload`]):
//! `{"event", "patient_id", "delivery_id", "attempt", ...}`. `event` is the configured
//! event name and `patient_id` the delivery's recipient (`to`). The ABI's outbound
//! message has no fields for anything else, so the daemon passes more (`seq`,
//! `direction`, ...) as a JSON object in the message body: its members are merged in
//! (and may override `event` and `patient_id`). A body that is not a JSON object is
//! text: it is sent as `body` (with `subject`) only when `include_body` is true, since
//! by default the push only tells the portal to fetch the conversation.
//!
//! # The answer
//! | answer | result |
//! | --- | --- |
//! | 2xx | sent; the provider id is the answer's `"id"` (a JSON string) or else the delivery id |
//! | 408, 425, 429 | retryable, honouring `Retry-After` (seconds), code = the status |
//! | other 4xx | permanent, code = the status: the portal refused this event (a bad signature, an unknown patient) and will refuse it again |
//! | 5xx, 1xx, 3xx (redirects are not followed) | retryable, code = the status |
//! | no answer | retryable, code `unreachable` |
//!
//! # Configuration (JSON)
//! `{"url": "https://portal.example/caremsg/events", "secret": "…", "event": "message",
//! "include_body": false}`
//! - `url` (required): the portal backend's endpoint; its host must be on the
//!   instance's allow-list.
//! - `secret` (required, at least 16 bytes): the HMAC key, shared with the portal.
//! - `event` (default `message`): the event name when the body names none.
//! - `include_body` (default `false`): send a text body (and subject) in the push.

pub mod signature;

use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use caremsg_plugin_sdk::{
    Gateway, Host, HttpRequest, Kind, Outbound, SendResult, export_plugin, redact,
};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// The HMAC key; `Debug` never shows it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

fn default_event() -> String {
    "message".to_owned()
}

/// The plugin's configuration (see the crate docs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The portal backend's endpoint.
    pub url: String,
    /// The HMAC key.
    pub secret: Secret,
    /// The event name when the body names none.
    #[serde(default = "default_event")]
    pub event: String,
    /// Whether a text body goes into the push.
    #[serde(default)]
    pub include_body: bool,
}

impl Config {
    /// Parses and checks a configuration. Messages name fields, never values.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = serde_json::from_str(text).map_err(|e| {
            format!(
                "The portal-webhook configuration is invalid: {}.",
                redact::quoted_values(&e.to_string())
            )
        })?;
        let lower = config.url.to_ascii_lowercase();
        let scheme_len = if lower.starts_with("https://") {
            "https://".len()
        } else if lower.starts_with("http://") {
            "http://".len()
        } else {
            return Err("url must be an http:// or https:// URL.".into());
        };
        if config.url.len() == scheme_len {
            return Err("url must name a host.".into());
        }
        if config.secret.expose().len() < MIN_SECRET_BYTES {
            return Err(format!(
                "secret must be at least {MIN_SECRET_BYTES} bytes long."
            ));
        }
        if config.event.trim().is_empty() {
            return Err("event must not be empty.".into());
        }
        Ok(config)
    }
}

/// The JSON object pushed for `message` (see the crate docs).
pub fn payload(config: &Config, message: &Outbound<'_>) -> Map<String, Value> {
    let mut object = Map::new();
    object.insert("event".into(), Value::String(config.event.clone()));
    if !message.to.trim().is_empty() {
        object.insert("patient_id".into(), Value::String(message.to.to_owned()));
    }
    match serde_json::from_str::<Value>(message.body) {
        Ok(Value::Object(fields)) => object.extend(fields),
        _ if config.include_body => {
            object.insert("body".into(), Value::String(message.body.to_owned()));
            if let Some(subject) = message.subject {
                object.insert("subject".into(), Value::String(subject.to_owned()));
            }
        }
        _ => {}
    }
    object.insert(
        "delivery_id".into(),
        Value::String(message.delivery_id.to_owned()),
    );
    object.insert("attempt".into(), Value::from(message.attempt));
    object
}

/// Maps the portal's answer (see the crate docs).
pub fn map_answer(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    delivery_id: &str,
) -> SendResult {
    let after = retry_after
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    match status {
        200..=299 => {
            let id = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
                .filter(|id| !id.trim().is_empty())
                .unwrap_or_else(|| delivery_id.to_owned());
            SendResult::sent(id)
        }
        408 | 425 | 429 => SendResult::Retryable {
            after,
            code: Some(status.to_string()),
            reason: format!("The portal answered HTTP {status}: try again later."),
        },
        400..=499 => SendResult::permanent(
            status.to_string(),
            format!("The portal refused the event with HTTP {status}."),
        ),
        _ => SendResult::Retryable {
            after,
            code: Some(status.to_string()),
            reason: format!("The portal answered HTTP {status}."),
        },
    }
}

/// Unix seconds of the host's clock (`Host::now`: the daemon's injected clock).
fn unix_seconds(host: &Host) -> u64 {
    // A clock before 1970 is a broken clock; 0 then makes the portal refuse the
    // timestamp, which is the right outcome.
    host.now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The gateway.
#[derive(Debug)]
pub struct Portal {
    /// For HTTP and log lines.
    host: Host,
    /// The settings.
    config: Config,
}

impl Gateway for Portal {
    fn start(config: &str, host: Host) -> Result<Self, String> {
        Ok(Portal {
            host,
            config: Config::parse(config)?,
        })
    }

    fn send(&self, message: &Outbound<'_>) -> SendResult {
        let object = payload(&self.config, message);
        if !object
            .get("patient_id")
            .is_some_and(|p| p.as_str().is_some_and(|s| !s.trim().is_empty()) || p.is_number())
        {
            return SendResult::permanent(
                "no-patient",
                "The delivery names no patient: its recipient is empty.",
            );
        }
        let body = Value::Object(object).to_string();
        let timestamp = unix_seconds(&self.host).to_string();
        let Some(signature) = signature::sign(
            self.config.secret.expose().as_bytes(),
            &timestamp,
            body.as_bytes(),
        ) else {
            return SendResult::permanent("signing-failed", "The push could not be signed.");
        };
        let headers = [
            ("content-type", "application/json"),
            (signature::TIMESTAMP_HEADER, timestamp.as_str()),
            (signature::SIGNATURE_HEADER, signature.as_str()),
            ("idempotency-key", message.idempotency_key),
            ("x-caremsg-delivery", message.delivery_id),
        ];
        let request = HttpRequest {
            method: "POST",
            url: &self.config.url,
            headers: &headers,
            body: body.as_bytes(),
            timeout: None,
        };
        let response = match self.host.http(&request) {
            Ok(response) => response,
            Err(error) => {
                let reason = format!(
                    "The portal could not be reached: {}",
                    redact::scrub(&error, 300)
                );
                self.host
                    .warn(&format!("Delivery {}: {reason}", message.delivery_id));
                return SendResult::Retryable {
                    after: None,
                    code: Some("unreachable".to_owned()),
                    reason,
                };
            }
        };
        let result = map_answer(
            response.status,
            response.header("retry-after"),
            &response.body,
            message.delivery_id,
        );
        match &result {
            SendResult::Sent { .. } => self.host.debug(&format!(
                "Delivery {} pushed to the portal (HTTP {}).",
                message.delivery_id, response.status
            )),
            SendResult::Permanent { .. } if matches!(response.status, 401 | 403) => {
                self.host.error(&format!(
                    "Delivery {}: the portal refused the push with HTTP {}; check that both \
                     sides share the same secret and that the clocks agree.",
                    message.delivery_id, response.status
                ));
            }
            _ => self.host.warn(&format!(
                "Delivery {}: the portal answered HTTP {}.",
                message.delivery_id, response.status
            )),
        }
        result
    }
}

export_plugin!(
    Portal,
    "portal-webhook",
    env!("CARGO_PKG_VERSION"),
    Kind::Portal
);

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef";

    fn config(extra: &str) -> Config {
        Config::parse(&format!(
            r#"{{"url": "https://portal.example/events", "secret": "{SECRET}"{extra}}}"#
        ))
        .expect("valid")
    }

    fn message<'a>(to: &'a str, body: &'a str) -> Outbound<'a> {
        Outbound {
            delivery_id: "d-7",
            to,
            from: "",
            body,
            idempotency_key: "k-7",
            subject: Some("Hello"),
            attempt: 2,
        }
    }

    #[test]
    fn config_is_checked() {
        for (text, fragment) in [
            (r#"{"url": "ftp://x", "secret": "0123456789abcdef"}"#, "url"),
            (
                r#"{"url": "https://", "secret": "0123456789abcdef"}"#,
                "url",
            ),
            (r#"{"url": "https://x", "secret": "short"}"#, "secret"),
            (
                r#"{"url": "https://x", "secret": "0123456789abcdef", "event": " "}"#,
                "event",
            ),
            (
                r#"{"url": "https://x", "secret": "0123456789abcdef", "oops": 1}"#,
                "oops",
            ),
            (r#"{"url": "https://x"}"#, "secret"),
            ("not json", "invalid"),
        ] {
            let error = Config::parse(text).expect_err(text);
            assert!(error.contains(fragment), "{text}: {error}");
            assert!(!error.contains("0123456789abcdef"), "{error}");
        }
        let c = config("");
        assert_eq!((c.event.as_str(), c.include_body), ("message", false));
        assert!(!format!("{c:?}").contains(SECRET));
    }

    #[test]
    fn payloads() {
        let check = |config: &Config, m: Outbound<'_>, expected: Value| {
            assert_eq!(Value::Object(payload(config, &m)), expected);
        };
        let plain = config("");
        check(
            &plain,
            message("p-1", "See you Tuesday."),
            serde_json::json!({"event": "message", "patient_id": "p-1", "delivery_id": "d-7", "attempt": 2}),
        );
        check(
            &config(r#", "include_body": true, "event": "staff_message""#),
            message("p-1", "See you Tuesday."),
            serde_json::json!({"event": "staff_message", "patient_id": "p-1", "body": "See you Tuesday.",
                "subject": "Hello", "delivery_id": "d-7", "attempt": 2}),
        );
        check(
            &plain,
            message(
                "p-1",
                r#"{"seq": 42, "direction": "to_patient", "event": "new_message"}"#,
            ),
            serde_json::json!({"event": "new_message", "patient_id": "p-1", "seq": 42,
                "direction": "to_patient", "delivery_id": "d-7", "attempt": 2}),
        );
        // The plugin's own fields cannot be overridden by the body.
        check(
            &plain,
            message(
                "",
                r#"{"patient_id": "p-2", "delivery_id": "x", "attempt": 9}"#,
            ),
            serde_json::json!({"event": "message", "patient_id": "p-2", "delivery_id": "d-7", "attempt": 2}),
        );
        check(
            &plain,
            message("", "[1, 2]"),
            serde_json::json!({"event": "message", "delivery_id": "d-7", "attempt": 2}),
        );
    }

    #[test]
    fn answers() {
        let check = |status: u16, retry_after: Option<&str>, body: &str, expected: SendResult| {
            assert_eq!(
                map_answer(status, retry_after, body.as_bytes(), "d-7"),
                expected,
                "{status} {body}"
            );
        };
        check(200, None, "", SendResult::sent("d-7"));
        check(202, None, r#"{"id": "evt-9"}"#, SendResult::sent("evt-9"));
        check(204, None, r#"{"id": 5}"#, SendResult::sent("d-7"));
        let retry = |status: u16, after: Option<u64>, reason: &str| SendResult::Retryable {
            after: after.map(Duration::from_secs),
            code: Some(status.to_string()),
            reason: reason.to_owned(),
        };
        check(
            429,
            Some("30"),
            "",
            retry(
                429,
                Some(30),
                "The portal answered HTTP 429: try again later.",
            ),
        );
        check(
            408,
            None,
            "",
            retry(408, None, "The portal answered HTTP 408: try again later."),
        );
        check(
            425,
            Some("x"),
            "",
            retry(425, None, "The portal answered HTTP 425: try again later."),
        );
        check(
            503,
            Some("2"),
            "",
            retry(503, Some(2), "The portal answered HTTP 503."),
        );
        check(
            500,
            None,
            "",
            retry(500, None, "The portal answered HTTP 500."),
        );
        check(
            302,
            None,
            "",
            retry(302, None, "The portal answered HTTP 302."),
        );
        for status in [400, 401, 403, 404, 410, 422] {
            check(
                status,
                None,
                "",
                SendResult::permanent(
                    status.to_string(),
                    format!("The portal refused the event with HTTP {status}."),
                ),
            );
        }
    }
}
