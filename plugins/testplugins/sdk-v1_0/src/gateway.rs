//! The safe side of the ABI: the [`Gateway`] trait plugin authors implement and the
//! types it speaks. Nothing here is `unsafe`; [`crate::ffi`] translates.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::abi;
use crate::ffi::{Host, WebhookEvents};
use crate::headers::Headers;

/// What kind of gateway a plugin is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Sends and receives SMS.
    Sms,
    /// Pushes conversation events to the patient portal's backend.
    Portal,
    /// Sends e-mail.
    Email,
}

impl Kind {
    /// The ABI value ([`abi::kind`]).
    pub const fn as_u32(self) -> u32 {
        match self {
            Kind::Sms => abi::kind::SMS,
            Kind::Portal => abi::kind::PORTAL,
            Kind::Email => abi::kind::EMAIL,
        }
    }

    /// The kind of an ABI value, if it is one.
    pub const fn from_u32(value: u32) -> Option<Kind> {
        match value {
            abi::kind::SMS => Some(Kind::Sms),
            abi::kind::PORTAL => Some(Kind::Portal),
            abi::kind::EMAIL => Some(Kind::Email),
            _ => None,
        }
    }

    /// Lower-case name, as in the configuration (`sms`, `portal`, `email`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Sms => "sms",
            Kind::Portal => "portal",
            Kind::Email => "email",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A gateway plugin. Implement it, then call [`crate::export_plugin!`].
///
/// The host calls `send`, `handle_webhook` and `health` from several threads at once
/// (hence `Send + Sync`), always on blocking threads, so blocking I/O is fine. A panic
/// in any method is caught by the SDK and reported to the host as a failed call; it
/// never takes the daemon down, but the instance may be left in whatever state the
/// panic left it.
///
/// Never put PHI (phone numbers, e-mail addresses, message bodies, names) in log
/// lines, error strings or panic messages.
pub trait Gateway: Send + Sync + Sized + 'static {
    /// Starts an instance from its configuration (a JSON document). Return a short
    /// message, without secrets, when the configuration is unusable. `host` stays
    /// valid until [`Gateway::stop`] returns; keep a copy to emit, log and do HTTP.
    fn start(config: &str, host: Host) -> Result<Self, String>;

    /// Sends one message. Must not block forever: bound every wait.
    fn send(&self, message: &Outbound<'_>) -> SendResult;

    /// Handles one provider webhook. Emit what it reports through `events` (not
    /// through [`Host::emit`]): the host commits those events before it sends the
    /// response, so answer 2xx only if every emit was [`EmitStatus::Accepted`], and a
    /// status that makes the provider retry (such as 503) otherwise.
    ///
    /// The default answers 404: the gateway takes no webhooks.
    fn handle_webhook(
        &self,
        request: &WebhookRequest<'_>,
        events: &mut WebhookEvents<'_>,
    ) -> WebhookResponse {
        let _ = (request, events);
        WebhookResponse::text(404, "This gateway takes no webhooks.")
    }

    /// Reports health. The default is [`Health::Ok`].
    fn health(&self) -> Health {
        Health::Ok
    }

    /// Stops: finish or abandon in-flight work and join every thread the instance
    /// started. Nothing is called after it, and nothing may be emitted after it.
    fn stop(self) {}
}

/// One message to send. Its `Debug` output hides the recipient, sender and body.
#[derive(Clone, Copy)]
pub struct Outbound<'a> {
    /// The host's delivery id (not PHI; fine to log).
    pub delivery_id: &'a str,
    /// Recipient: an E.164 number or an e-mail address (PHI).
    pub to: &'a str,
    /// Sender; empty means "the gateway's configured sender" (PHI for patients).
    pub from: &'a str,
    /// Text (PHI).
    pub body: &'a str,
    /// Stable across retries of this delivery: pass it to providers that deduplicate.
    pub idempotency_key: &'a str,
    /// Subject line, for e-mail.
    pub subject: Option<&'a str>,
    /// 1 for the first attempt, then 2, 3, ...
    pub attempt: u32,
}

impl fmt::Debug for Outbound<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound")
            .field("delivery_id", &self.delivery_id)
            .field("to", &"[redacted]")
            .field("from", &"[redacted]")
            .field("body", &"[redacted]")
            .field("idempotency_key", &self.idempotency_key)
            .field("subject", &self.subject.map(|_| "[redacted]"))
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// The outcome of [`Gateway::send`]. Reasons and codes must not contain PHI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendResult {
    /// The provider accepted the message.
    Sent {
        /// The provider's id for it (receipts refer to it).
        provider_id: String,
    },
    /// A temporary failure: the host retries with back-off.
    Retryable {
        /// The provider's hint, such as an HTTP `Retry-After`.
        after: Option<Duration>,
        /// The provider's error code, if it gave one.
        code: Option<String>,
        /// What went wrong.
        reason: String,
    },
    /// A failure that retrying cannot fix.
    Permanent {
        /// The provider's error code (or a stable code of the plugin's own).
        code: String,
        /// What went wrong.
        reason: String,
    },
    /// The recipient unsubscribed at the provider: the host records an opt-out.
    Unsubscribed {
        /// What the provider said.
        reason: String,
    },
}

impl SendResult {
    /// [`SendResult::Sent`].
    pub fn sent(provider_id: impl Into<String>) -> Self {
        SendResult::Sent {
            provider_id: provider_id.into(),
        }
    }

    /// [`SendResult::Retryable`] without a hint or code.
    pub fn retryable(reason: impl Into<String>) -> Self {
        SendResult::Retryable {
            after: None,
            code: None,
            reason: reason.into(),
        }
    }

    /// [`SendResult::Retryable`] with the provider's wait hint.
    pub fn retry_after(after: Duration, reason: impl Into<String>) -> Self {
        SendResult::Retryable {
            after: Some(after),
            code: None,
            reason: reason.into(),
        }
    }

    /// [`SendResult::Permanent`].
    pub fn permanent(code: impl Into<String>, reason: impl Into<String>) -> Self {
        SendResult::Permanent {
            code: code.into(),
            reason: reason.into(),
        }
    }

    /// [`SendResult::Unsubscribed`].
    pub fn unsubscribed(reason: impl Into<String>) -> Self {
        SendResult::Unsubscribed {
            reason: reason.into(),
        }
    }
}

/// The answer of [`Gateway::health`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Working.
    Ok,
    /// Working with reduced capacity.
    Degraded(String),
    /// Not working.
    Down(String),
}

/// A provider's request to the hook `/v1/hooks/{instance}`, borrowed for the call.
#[derive(Clone, Copy)]
pub struct WebhookRequest<'a> {
    /// HTTP method, upper case.
    pub method: &'a str,
    /// The configured public URL of this hook, with the request's query string
    /// appended when it has one: exactly what providers sign.
    pub public_url: &'a str,
    /// The peer's address; `None` when the daemon listens on a Unix socket.
    pub remote_addr: Option<SocketAddr>,
    /// The request headers.
    pub headers: Headers<'a>,
    /// The raw body.
    pub body: &'a [u8],
}

impl WebhookRequest<'_> {
    /// Whether the request came from this machine's loopback (127.0.0.0/8 or ::1,
    /// IPv4-mapped forms included). `false` when the address is unknown.
    pub fn is_from_loopback(&self) -> bool {
        self.remote_addr
            .is_some_and(|addr| match addr.ip().to_canonical() {
                IpAddr::V4(ip) => ip.is_loopback(),
                IpAddr::V6(ip) => ip.is_loopback(),
            })
    }
}

impl fmt::Debug for WebhookRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookRequest")
            .field("method", &self.method)
            .field("public_url", &self.public_url)
            .field("remote_addr", &self.remote_addr)
            .field(
                "body",
                &format_args!("[{} bytes redacted]", self.body.len()),
            )
            .finish_non_exhaustive()
    }
}

/// The answer to a webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers (invalid ones are dropped at the boundary).
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
}

impl WebhookResponse {
    /// A response with no headers and no body.
    pub fn empty(status: u16) -> Self {
        WebhookResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        WebhookResponse::empty(status)
            .with_header("content-type", "text/plain; charset=utf-8")
            .with_body(body.into().into_bytes())
    }

    /// An `application/json` response from an already serialised document.
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        WebhookResponse::empty(status)
            .with_header("content-type", "application/json")
            .with_body(body.into().into_bytes())
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replaces the body.
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
}

/// Status of a delivery receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReceiptStatus {
    /// Handed to the carrier.
    Sent,
    /// Delivered to the handset.
    Delivered,
    /// The provider could not send it.
    Failed,
    /// The carrier could not deliver it.
    Undelivered,
}

impl ReceiptStatus {
    /// The ABI value ([`abi::receipt`]).
    pub const fn as_u32(self) -> u32 {
        match self {
            ReceiptStatus::Sent => abi::receipt::SENT,
            ReceiptStatus::Delivered => abi::receipt::DELIVERED,
            ReceiptStatus::Failed => abi::receipt::FAILED,
            ReceiptStatus::Undelivered => abi::receipt::UNDELIVERED,
        }
    }

    /// The status of an ABI value, if it is one.
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            abi::receipt::SENT => Some(ReceiptStatus::Sent),
            abi::receipt::DELIVERED => Some(ReceiptStatus::Delivered),
            abi::receipt::FAILED => Some(ReceiptStatus::Failed),
            abi::receipt::UNDELIVERED => Some(ReceiptStatus::Undelivered),
            _ => None,
        }
    }
}

/// Something that happened at the provider, for the host. `Debug` hides PHI.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A message from a patient.
    InboundMessage {
        /// Sender's number.
        from: &'a str,
        /// The clinic's number it was sent to.
        to: &'a str,
        /// The text.
        body: &'a str,
        /// The provider's id of the message; the host stores each id once.
        provider_message_id: &'a str,
    },
    /// News about a message the host sent.
    DeliveryReceipt {
        /// The id [`SendResult::Sent`] returned.
        provider_message_id: &'a str,
        /// The new status.
        status: ReceiptStatus,
        /// The provider's error code, when it failed.
        error_code: Option<&'a str>,
    },
    /// The provider reports that a number opted out (for example after "STOP").
    OptOut {
        /// The number.
        number: &'a str,
    },
}

impl fmt::Debug for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::InboundMessage {
                provider_message_id,
                ..
            } => f
                .debug_struct("InboundMessage")
                .field("provider_message_id", provider_message_id)
                .finish_non_exhaustive(),
            Event::DeliveryReceipt {
                provider_message_id,
                status,
                error_code,
            } => f
                .debug_struct("DeliveryReceipt")
                .field("provider_message_id", provider_message_id)
                .field("status", status)
                .field("error_code", error_code)
                .finish(),
            Event::OptOut { .. } => f.debug_struct("OptOut").finish_non_exhaustive(),
        }
    }
}

impl Event<'_> {
    /// The ABI record (borrowing from `self`).
    pub fn to_abi(&self) -> abi::Event {
        use abi::Slice;
        let mut raw = abi::Event {
            kind: 0,
            receipt_status: 0,
            from: Slice::NONE,
            to: Slice::NONE,
            body: Slice::NONE,
            provider_message_id: Slice::NONE,
            error_code: Slice::NONE,
            number: Slice::NONE,
        };
        match *self {
            Event::InboundMessage {
                from,
                to,
                body,
                provider_message_id,
            } => {
                raw.kind = abi::event::INBOUND_MESSAGE;
                raw.from = Slice::from_text(from);
                raw.to = Slice::from_text(to);
                raw.body = Slice::from_text(body);
                raw.provider_message_id = Slice::from_text(provider_message_id);
            }
            Event::DeliveryReceipt {
                provider_message_id,
                status,
                error_code,
            } => {
                raw.kind = abi::event::DELIVERY_RECEIPT;
                raw.receipt_status = status.as_u32();
                raw.provider_message_id = Slice::from_text(provider_message_id);
                raw.error_code = Slice::from_opt_text(error_code);
            }
            Event::OptOut { number } => {
                raw.kind = abi::event::OPT_OUT;
                raw.number = Slice::from_text(number);
            }
        }
        raw
    }
}

/// What the host did with an emitted event.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmitStatus {
    /// The host took it.
    Accepted,
    /// The host is saturated and did not take it. Do not wait for it: report a
    /// retryable failure (a 503 to a webhook) and let the provider retry.
    Busy,
    /// The host refused it (malformed, or the instance is stopped).
    Rejected,
}

impl EmitStatus {
    /// The status of an ABI value; unknown values count as rejected.
    pub const fn from_u32(value: u32) -> Self {
        match value {
            abi::emit::ACCEPTED => EmitStatus::Accepted,
            abi::emit::BUSY => EmitStatus::Busy,
            _ => EmitStatus::Rejected,
        }
    }
}

/// Severity of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something is broken.
    Error,
    /// Something is wrong but work goes on.
    Warn,
    /// Normal operation.
    Info,
    /// Detail for debugging.
    Debug,
    /// Even more detail.
    Trace,
}

impl Level {
    /// The ABI value ([`abi::level`]).
    pub const fn as_u32(self) -> u32 {
        match self {
            Level::Error => abi::level::ERROR,
            Level::Warn => abi::level::WARN,
            Level::Info => abi::level::INFO,
            Level::Debug => abi::level::DEBUG,
            Level::Trace => abi::level::TRACE,
        }
    }
}

/// An HTTP request for the host's client ([`Host::http`]).
#[derive(Clone, Copy)]
pub struct HttpRequest<'a> {
    /// Method, upper case.
    pub method: &'a str,
    /// Absolute URL. Its host must be on the instance's allow-list in the daemon's
    /// configuration.
    pub url: &'a str,
    /// Request headers.
    pub headers: &'a [(&'a str, &'a str)],
    /// Request body.
    pub body: &'a [u8],
    /// Timeout; `None` means the host's default, which is also the ceiling.
    pub timeout: Option<Duration>,
}

impl fmt::Debug for HttpRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("url", &self.url)
            .field(
                "body",
                &format_args!("[{} bytes redacted]", self.body.len()),
            )
            .finish_non_exhaustive()
    }
}

/// The host's HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-case.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_phi() {
        let outbound = Outbound {
            delivery_id: "d-1",
            to: "+15550100",
            from: "+15550199",
            body: "secret body",
            idempotency_key: "k",
            subject: Some("secret subject"),
            attempt: 1,
        };
        let text = format!("{outbound:?}");
        assert!(!text.contains("1555") && !text.contains("secret"), "{text}");
        let event = Event::InboundMessage {
            from: "+15550100",
            to: "+15550199",
            body: "secret",
            provider_message_id: "m1",
        };
        let text = format!("{event:?}");
        assert!(
            !text.contains("1555") && !text.contains("secret") && text.contains("m1"),
            "{text}"
        );
    }

    #[test]
    fn loopback_detection() {
        let cases = [
            (Some("127.0.0.1:1"), true),
            (Some("127.8.9.10:1"), true),
            (Some("[::1]:1"), true),
            (Some("[::ffff:127.0.0.1]:1"), true),
            (Some("10.0.0.1:1"), false),
            (Some("[2001:db8::1]:1"), false),
            (None, false),
        ];
        for (addr, expected) in cases {
            let request = WebhookRequest {
                method: "POST",
                public_url: "http://x/",
                remote_addr: addr.and_then(|a| a.parse().ok()),
                headers: Headers::default(),
                body: b"",
            };
            assert_eq!(request.is_from_loopback(), expected, "{addr:?}");
        }
    }

    #[test]
    fn enums_round_trip_through_u32() {
        for kind in [Kind::Sms, Kind::Portal, Kind::Email] {
            assert_eq!(Kind::from_u32(kind.as_u32()), Some(kind));
        }
        for status in [
            ReceiptStatus::Sent,
            ReceiptStatus::Delivered,
            ReceiptStatus::Failed,
            ReceiptStatus::Undelivered,
        ] {
            assert_eq!(ReceiptStatus::from_u32(status.as_u32()), Some(status));
        }
        assert_eq!(Kind::from_u32(0), None);
        assert_eq!(EmitStatus::from_u32(77), EmitStatus::Rejected);
    }
}
