//! The REST side: the form Twilio's `Messages.json` endpoint takes, and how its answer
//! maps to a [`SendResult`].
//!
//! | answer | result |
//! | --- | --- |
//! | 2xx with a `sid` | sent; the `sid` (`SM…`) is the provider id |
//! | 2xx without a `sid` | permanent `twilio-malformed-response` (it may have been sent: never retried blindly) |
//! | error 21610 (recipient unsubscribed) | unsubscribed: the daemon records an opt-out |
//! | error 20429 or HTTP 429 | retryable, honouring `Retry-After` (seconds) |
//! | errors 21211, 21612, 21614, 30004–30007 | permanent, with the code |
//! | HTTP 408 or 5xx | retryable, with Twilio's code (or the HTTP status) |
//! | any other 4xx | permanent, with Twilio's code (or the HTTP status) and its message |
//! | anything else (1xx, 3xx) | permanent `http-<status>` |
//!
//! Twilio's messages can name the recipient ("The 'To' number +1… is not valid"), so
//! they pass through [`redact::scrub`] before they become a reason.

use std::time::Duration;

use caremsg_plugin_sdk::SendResult;
use caremsg_plugin_sdk::redact;
use serde::Deserialize;

/// Twilio's code for "the recipient replied STOP to this sender".
pub const UNSUBSCRIBED: u32 = 21610;
/// Twilio's code for "too many requests".
pub const TOO_MANY_REQUESTS: u32 = 20429;
/// Twilio's code for "authenticate" (wrong account SID or auth token).
pub const AUTHENTICATE: u32 = 20003;

/// Codes that no retry can fix: invalid `To` (21211), unreachable or unsupported
/// destination (21612, 21614), and the carrier's final refusals (30004 blocked,
/// 30005 unknown or inactive number, 30006 landline or unreachable carrier,
/// 30007 filtered as spam).
const PERMANENT: [u32; 7] = [21211, 21612, 21614, 30004, 30005, 30006, 30007];

/// How much of Twilio's message a reason keeps.
const MAX_MESSAGE: usize = 200;

/// The fields of Twilio's answer that matter here (a message resource on success,
/// an error document otherwise).
#[derive(Debug, Default, Deserialize)]
struct Answer {
    /// The message SID (success).
    #[serde(default)]
    sid: Option<String>,
    /// The message status (success: `queued`, `accepted`, ...); on an error document
    /// this is the HTTP status as a number, hence untyped.
    #[serde(default)]
    status: Option<serde_json::Value>,
    /// The error code of an error document.
    #[serde(default)]
    code: Option<serde_json::Value>,
    /// The error message of an error document.
    #[serde(default)]
    message: Option<String>,
}

/// A JSON number or string as text (Twilio sends codes as numbers).
fn text_of(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        _ => None,
    }
}

/// What a send produced, with what the log line may say about it.
#[derive(Debug, PartialEq, Eq)]
pub struct Mapped {
    /// The result for the daemon.
    pub result: SendResult,
    /// Twilio's message status on success (`queued`, `accepted`, ...).
    pub status: Option<String>,
    /// Whether Twilio refused the credentials (HTTP 401 or error 20003).
    pub credentials_refused: bool,
}

/// Maps Twilio's answer: `status` is the HTTP status, `retry_after` the header.
pub fn map_answer(status: u16, retry_after: Option<&str>, body: &[u8]) -> Mapped {
    let answer: Answer = serde_json::from_slice(body).unwrap_or_default();
    let code_text = text_of(answer.code.as_ref());
    let code: Option<u32> = code_text.as_deref().and_then(|c| c.parse().ok());
    let message = answer
        .message
        .as_deref()
        .map(|m| redact::scrub(m, MAX_MESSAGE))
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "no message".to_owned());
    let code_or_status = code_text.clone().unwrap_or_else(|| status.to_string());
    let credentials_refused = status == 401 || code == Some(AUTHENTICATE);
    let refused = match &code_text {
        Some(code) => format!("Twilio answered HTTP {status} with error {code}: {message}"),
        None => format!("Twilio answered HTTP {status} without an error document."),
    };
    let retry_after = retry_after
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);

    let result = if (200..300).contains(&status) {
        match answer.sid.as_deref().map(str::trim) {
            Some(sid) if !sid.is_empty() => {
                return Mapped {
                    result: SendResult::sent(sid),
                    status: text_of(answer.status.as_ref()),
                    credentials_refused: false,
                };
            }
            _ => SendResult::permanent(
                "twilio-malformed-response",
                format!(
                    "Twilio answered HTTP {status} without a message sid; the message may have \
                     been sent, so it is not retried."
                ),
            ),
        }
    } else if code == Some(UNSUBSCRIBED) {
        SendResult::unsubscribed(format!(
            "Twilio error {UNSUBSCRIBED}: the recipient has unsubscribed from this sender."
        ))
    } else if status == 429 || code == Some(TOO_MANY_REQUESTS) {
        SendResult::Retryable {
            after: retry_after,
            code: Some(code_or_status),
            reason: refused,
        }
    } else if code.is_some_and(|c| PERMANENT.contains(&c)) {
        SendResult::permanent(code_or_status, refused)
    } else if status == 408 || (500..600).contains(&status) {
        SendResult::Retryable {
            after: retry_after,
            code: Some(code_or_status),
            reason: refused,
        }
    } else if (400..500).contains(&status) {
        SendResult::permanent(code_or_status, refused)
    } else {
        SendResult::permanent(
            format!("http-{status}"),
            format!("Twilio answered with the unexpected HTTP status {status}."),
        )
    };
    Mapped {
        result,
        status: None,
        credentials_refused,
    }
}

/// The form fields of one message, in the order they are sent.
#[derive(Debug)]
pub struct Form<'a> {
    /// `To`.
    pub to: &'a str,
    /// `From`, when given.
    pub from: Option<&'a str>,
    /// `MessagingServiceSid`, when configured.
    pub messaging_service_sid: Option<&'a str>,
    /// `Body`.
    pub body: &'a str,
    /// `StatusCallback`, when status callbacks are on.
    pub status_callback: Option<&'a str>,
}

impl Form<'_> {
    /// `application/x-www-form-urlencoded`.
    pub fn encode(&self) -> String {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("To", self.to);
        if let Some(from) = self.from {
            form.append_pair("From", from);
        }
        if let Some(sid) = self.messaging_service_sid {
            form.append_pair("MessagingServiceSid", sid);
        }
        form.append_pair("Body", self.body);
        if let Some(url) = self.status_callback {
            form.append_pair("StatusCallback", url);
        }
        form.finish()
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn error(code: u32, http: u16) -> String {
        format!(
            r#"{{"code": {code}, "message": "The 'To' number +15550100 is not valid.", "more_info": "https://www.twilio.com/docs/errors/{code}", "status": {http}}}"#
        )
    }

    #[derive(Debug)]
    enum Want {
        Sent(&'static str),
        Retry(Option<u64>, &'static str),
        Permanent(&'static str),
        Unsubscribed,
    }

    fn check(status: u16, retry_after: Option<&str>, body: &str, want: Want) {
        let mapped = map_answer(status, retry_after, body.as_bytes());
        let ok = match (&mapped.result, &want) {
            (SendResult::Sent { provider_id }, Want::Sent(id)) => provider_id == id,
            (SendResult::Retryable { after, code, .. }, Want::Retry(secs, want_code)) => {
                *after == secs.map(Duration::from_secs) && code.as_deref() == Some(*want_code)
            }
            (SendResult::Permanent { code, .. }, Want::Permanent(want_code)) => code == want_code,
            (SendResult::Unsubscribed { .. }, Want::Unsubscribed) => true,
            _ => false,
        };
        assert!(
            ok,
            "{status} {body}: got {:?}, want {want:?}",
            mapped.result
        );
        let reason = format!("{:?}", mapped.result);
        assert!(!reason.contains("5550100"), "PHI in {reason}");
    }

    #[test]
    fn mapping() {
        let created =
            r#"{"sid": "SM0123", "status": "queued", "error_code": null, "to": "+15550100"}"#;
        check(201, None, created, Want::Sent("SM0123"));
        check(200, None, created, Want::Sent("SM0123"));
        check(
            201,
            None,
            "{}",
            Want::Permanent("twilio-malformed-response"),
        );
        check(
            201,
            None,
            "not json",
            Want::Permanent("twilio-malformed-response"),
        );
        check(
            201,
            None,
            r#"{"sid": " "}"#,
            Want::Permanent("twilio-malformed-response"),
        );
        check(400, None, &error(21610, 400), Want::Unsubscribed);
        for code in [21211, 21612, 21614, 30004, 30005, 30006, 30007] {
            let text: &'static str = Box::leak(code.to_string().into_boxed_str());
            check(400, None, &error(code, 400), Want::Permanent(text));
        }
        check(
            429,
            Some("7"),
            &error(20429, 429),
            Want::Retry(Some(7), "20429"),
        );
        check(429, None, "", Want::Retry(None, "429"));
        check(429, Some("soon"), "", Want::Retry(None, "429"));
        check(
            400,
            Some(" 3 "),
            &error(20429, 400),
            Want::Retry(Some(3), "20429"),
        );
        check(500, None, "", Want::Retry(None, "500"));
        check(
            503,
            Some("2"),
            &error(20500, 503),
            Want::Retry(Some(2), "20500"),
        );
        check(408, None, "", Want::Retry(None, "408"));
        check(400, None, &error(21604, 400), Want::Permanent("21604"));
        check(401, None, &error(20003, 401), Want::Permanent("20003"));
        check(404, None, "<html>", Want::Permanent("404"));
        check(302, None, "", Want::Permanent("http-302"));
        check(400, None, r#"{"code": "21211"}"#, Want::Permanent("21211"));
    }

    #[test]
    fn reasons_carry_the_code_and_a_scrubbed_message() {
        let mapped = map_answer(400, None, error(21604, 400).as_bytes());
        let SendResult::Permanent { reason, .. } = mapped.result else {
            panic!("permanent");
        };
        assert_eq!(
            reason,
            "Twilio answered HTTP 400 with error 21604: The 'To' number [redacted] is not valid."
        );
    }

    #[test]
    fn credentials_refusal_is_noticed() {
        assert!(map_answer(401, None, error(20003, 401).as_bytes()).credentials_refused);
        assert!(map_answer(401, None, b"").credentials_refused);
        assert!(!map_answer(400, None, error(21211, 400).as_bytes()).credentials_refused);
    }

    #[test]
    fn form_encoding() {
        let form = Form {
            to: "+15550100",
            from: Some("+15550199"),
            messaging_service_sid: None,
            body: "Hi & bye = 100% ü",
            status_callback: Some("https://clinic.example/v1/hooks/twilio"),
        };
        assert_eq!(
            form.encode(),
            "To=%2B15550100&From=%2B15550199&Body=Hi+%26+bye+%3D+100%25+%C3%BC\
             &StatusCallback=https%3A%2F%2Fclinic.example%2Fv1%2Fhooks%2Ftwilio"
        );
        let service = Form {
            to: "+15550100",
            from: None,
            messaging_service_sid: Some("MG123"),
            body: "",
            status_callback: None,
        };
        assert_eq!(
            service.encode(),
            "To=%2B15550100&MessagingServiceSid=MG123&Body="
        );
    }
}
