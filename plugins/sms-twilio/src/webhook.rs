//! The webhook side: what Twilio POSTs to `/v1/hooks/{instance}` and what it reports.
//!
//! - **Inbound SMS** (`From`, `To`, `Body`, `MessageSid`): an inbound-message event,
//!   answered with an empty TwiML document, so Twilio sends no reply of its own.
//!   Keywords such as STOP are the daemon's business: the text is passed on as is.
//! - **Status callback** (`MessageSid`, `MessageStatus`, `ErrorCode`): a delivery
//!   receipt for `sent`, `delivered` (and WhatsApp's `read`), `undelivered`, `failed`
//!   (and `canceled`); the intermediate statuses (`queued`, `accepted`, `sending`,
//!   `scheduled`, ...) move nothing forward and are acknowledged without an event. A
//!   failure with error 21610 (the recipient unsubscribed) also reports an opt-out of
//!   the `To` number.
//!
//! A request is either: one with a `MessageStatus` other than `received` is a status
//! callback, anything else an inbound message.

use caremsg_plugin_sdk::ReceiptStatus;

/// What a verified request reports.
#[derive(Debug, PartialEq, Eq)]
pub enum Report<'a> {
    /// A patient's text.
    Inbound {
        /// `MessageSid`.
        sid: &'a str,
        /// `From`.
        from: &'a str,
        /// `To`.
        to: &'a str,
        /// `Body` (empty for a picture-only message).
        body: &'a str,
    },
    /// News about a message the daemon sent.
    Status {
        /// `MessageSid`.
        sid: &'a str,
        /// The receipt, or `None` for an intermediate status.
        receipt: Option<ReceiptStatus>,
        /// `ErrorCode`, when not empty.
        error_code: Option<&'a str>,
        /// The `To` number to record an opt-out for (failure with error 21610).
        opted_out: Option<&'a str>,
    },
}

/// Why a verified request cannot be used (for the 400 answer; no PHI).
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// The first value of parameter `name`.
pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn non_empty<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    param(params, name).map(str::trim).filter(|v| !v.is_empty())
}

/// Twilio's message status as a receipt; `None` for statuses that move nothing.
pub fn receipt(status: &str) -> Option<ReceiptStatus> {
    match status.trim().to_ascii_lowercase().as_str() {
        "sent" => Some(ReceiptStatus::Sent),
        "delivered" | "read" => Some(ReceiptStatus::Delivered),
        "undelivered" => Some(ReceiptStatus::Undelivered),
        "failed" | "canceled" => Some(ReceiptStatus::Failed),
        _ => None,
    }
}

/// Reads a verified request's parameters.
pub fn classify(params: &[(String, String)]) -> Result<Report<'_>, Malformed> {
    let sid = non_empty(params, "MessageSid")
        .or_else(|| non_empty(params, "SmsSid"))
        .ok_or(Malformed("MessageSid is missing."))?;
    let status = non_empty(params, "MessageStatus").or_else(|| non_empty(params, "SmsStatus"));
    match status {
        Some(status) if !status.eq_ignore_ascii_case("received") => {
            let receipt = receipt(status);
            let error_code = non_empty(params, "ErrorCode").filter(|c| *c != "0");
            let failed = matches!(
                receipt,
                Some(ReceiptStatus::Failed | ReceiptStatus::Undelivered)
            );
            let opted_out = if failed && error_code == Some("21610") {
                non_empty(params, "To")
            } else {
                None
            };
            Ok(Report::Status {
                sid,
                receipt,
                error_code,
                opted_out,
            })
        }
        _ => Ok(Report::Inbound {
            sid,
            from: non_empty(params, "From").ok_or(Malformed("From is missing."))?,
            to: non_empty(params, "To").ok_or(Malformed("To is missing."))?,
            body: param(params, "Body").unwrap_or_default(),
        }),
    }
}

/// Decodes an `application/x-www-form-urlencoded` body (`+` is a space; invalid
/// UTF-8 is replaced, which then fails the signature check).
pub fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body)
        .map(|(n, v)| (n.into_owned(), v.into_owned()))
        .collect()
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn check(body: &str, expected: Result<Report<'_>, Malformed>) {
        let params = parse_form(body.as_bytes());
        assert_eq!(classify(&params), expected, "{body}");
    }

    #[test]
    fn inbound_and_status() {
        check(
            "MessageSid=SM1&From=%2B15550100&To=%2B15550199&Body=Hello+there&SmsStatus=received",
            Ok(Report::Inbound {
                sid: "SM1",
                from: "+15550100",
                to: "+15550199",
                body: "Hello there",
            }),
        );
        check(
            "MessageSid=SM1&From=%2B15550100&To=%2B15550199&NumMedia=1",
            Ok(Report::Inbound {
                sid: "SM1",
                from: "+15550100",
                to: "+15550199",
                body: "",
            }),
        );
        check(
            "SmsSid=SM2&From=a&To=b&Body=x",
            Ok(Report::Inbound {
                sid: "SM2",
                from: "a",
                to: "b",
                body: "x",
            }),
        );
        check(
            "MessageSid=SM3&MessageStatus=delivered&To=%2B15550100",
            Ok(Report::Status {
                sid: "SM3",
                receipt: Some(ReceiptStatus::Delivered),
                error_code: None,
                opted_out: None,
            }),
        );
        check(
            "MessageSid=SM3&MessageStatus=undelivered&ErrorCode=30005",
            Ok(Report::Status {
                sid: "SM3",
                receipt: Some(ReceiptStatus::Undelivered),
                error_code: Some("30005"),
                opted_out: None,
            }),
        );
        check(
            "MessageSid=SM3&MessageStatus=failed&ErrorCode=21610&To=%2B15550100",
            Ok(Report::Status {
                sid: "SM3",
                receipt: Some(ReceiptStatus::Failed),
                error_code: Some("21610"),
                opted_out: Some("+15550100"),
            }),
        );
        check(
            "MessageSid=SM3&MessageStatus=sent&ErrorCode=",
            Ok(Report::Status {
                sid: "SM3",
                receipt: Some(ReceiptStatus::Sent),
                error_code: None,
                opted_out: None,
            }),
        );
        check(
            "MessageSid=SM3&MessageStatus=queued",
            Ok(Report::Status {
                sid: "SM3",
                receipt: None,
                error_code: None,
                opted_out: None,
            }),
        );
        check(
            "From=a&To=b&Body=x",
            Err(Malformed("MessageSid is missing.")),
        );
        check(
            "MessageSid=SM1&To=b&Body=x",
            Err(Malformed("From is missing.")),
        );
        check(
            "MessageSid=SM1&From=a&Body=x",
            Err(Malformed("To is missing.")),
        );
        check("", Err(Malformed("MessageSid is missing.")));
    }

    #[test]
    fn statuses() {
        for (status, expected) in [
            ("sent", Some(ReceiptStatus::Sent)),
            ("delivered", Some(ReceiptStatus::Delivered)),
            ("read", Some(ReceiptStatus::Delivered)),
            ("undelivered", Some(ReceiptStatus::Undelivered)),
            ("failed", Some(ReceiptStatus::Failed)),
            ("canceled", Some(ReceiptStatus::Failed)),
            ("Delivered", Some(ReceiptStatus::Delivered)),
            ("queued", None),
            ("accepted", None),
            ("sending", None),
            ("scheduled", None),
            ("something-new", None),
        ] {
            assert_eq!(receipt(status), expected, "{status}");
        }
    }
}
