//! The owned types the host speaks with the daemon, and the [`HostServices`] trait
//! the daemon implements for plugins. No ABI type appears here.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

pub use caremsg_plugin_sdk::{
    Health, HttpResponse, Kind, Level, ReceiptStatus, SendResult as SendOutcome, WebhookResponse,
};

/// One message for a plugin to send. `Debug` hides the recipient, sender, subject and body.
#[derive(Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The daemon's delivery id.
    pub delivery_id: String,
    /// Recipient: an E.164 number or an e-mail address.
    pub to: String,
    /// Sender; empty means "the gateway's configured sender".
    pub from: String,
    /// Text.
    pub body: String,
    /// Stable across retries of the same delivery.
    pub idempotency_key: String,
    /// Subject line (e-mail).
    pub subject: Option<String>,
    /// 1 for the first attempt, then 2, 3, ...
    pub attempt: u32,
}

impl fmt::Debug for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound")
            .field("delivery_id", &self.delivery_id)
            .field("to", &"[redacted]")
            .field("from", &"[redacted]")
            .field("body", &"[redacted]")
            .field("idempotency_key", &self.idempotency_key)
            .field("subject", &self.subject.as_ref().map(|_| "[redacted]"))
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// An event a plugin reports. `Debug` hides numbers and bodies.
#[derive(Clone, PartialEq, Eq)]
pub enum Event {
    /// A message from a patient.
    InboundMessage {
        /// Sender's number.
        from: String,
        /// The clinic's number it was sent to.
        to: String,
        /// The text.
        body: String,
        /// The provider's id of the message (unique per gateway instance).
        provider_message_id: String,
    },
    /// News about a message the daemon sent.
    DeliveryReceipt {
        /// The id `send` returned.
        provider_message_id: String,
        /// The new status.
        status: ReceiptStatus,
        /// The provider's error code, when it failed.
        error_code: Option<String>,
    },
    /// The provider reports that a number opted out.
    OptOut {
        /// The number.
        number: String,
    },
}

impl fmt::Debug for Event {
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

/// What the daemon did with an event emitted outside a webhook call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmitOutcome {
    /// Taken.
    Accepted,
    /// Saturated; not taken. The plugin must not block waiting.
    Busy,
}

/// A provider's request to `/v1/hooks/{instance}`. `Debug` hides the body.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookRequest {
    /// HTTP method, upper case.
    pub method: String,
    /// The configured public URL of the hook plus the request's query string, if any.
    pub public_url: String,
    /// The peer's address; `None` on a Unix socket.
    pub remote_addr: Option<SocketAddr>,
    /// Headers, names lower-case; values as received.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The raw body (the daemon limits its size).
    pub body: Vec<u8>,
}

impl fmt::Debug for WebhookRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookRequest")
            .field("method", &self.method)
            .field("public_url", &self.public_url)
            .field("remote_addr", &self.remote_addr)
            .field("headers", &self.headers.len())
            .field(
                "body",
                &format_args!("[{} bytes redacted]", self.body.len()),
            )
            .finish()
    }
}

/// A webhook's response together with the events the plugin emitted while handling
/// it. Commit `events` first, then send `response`: a provider that sees a 2xx
/// never sends the request again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookOutcome {
    /// What to answer the provider, after the events are committed.
    pub response: WebhookResponse,
    /// Events reported by the request, in the order the plugin emitted them.
    pub events: Vec<Event>,
}

/// An HTTP request a plugin asks the daemon to perform. `Debug` hides the body.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// Method, upper case.
    pub method: String,
    /// Absolute URL.
    pub url: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// The plugin's timeout; `None` means the daemon's default (also the ceiling).
    pub timeout: Option<Duration>,
}

impl fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &self.headers.len())
            .field(
                "body",
                &format_args!("[{} bytes redacted]", self.body.len()),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The services the daemon gives every plugin instance. Implementations are called
/// from the plugin's threads (blocking threads), several at once.
pub trait HostServices: Send + Sync {
    /// Takes an event a plugin emitted outside a webhook call. Must not block:
    /// answer [`EmitOutcome::Busy`] when saturated.
    fn emit(&self, instance: &str, event: Event) -> EmitOutcome;

    /// Writes a plugin's log line (tag it with `instance`).
    fn log(&self, instance: &str, level: Level, message: &str);

    /// Performs an HTTP request for a plugin ([`crate::HyperHttp`] does the work).
    fn http(&self, instance: &str, request: HttpRequest) -> Result<HttpResponse, String>;

    /// The public webhook URL of `instance` (`server.public_url` +
    /// `/v1/hooks/{instance}`), for `Host::hook_url` (ABI 1.1). Must not block.
    /// Default: none.
    fn hook_url(&self, instance: &str) -> Option<String> {
        let _ = instance;
        None
    }

    /// The time plugins see through `Host::now` (ABI 1.1): the daemon's injected
    /// clock. Must not block. Default: the wall clock.
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_phi() {
        let outbound = Outbound {
            delivery_id: "d1".into(),
            to: "+15550100".into(),
            from: "+15550199".into(),
            body: "secret".into(),
            idempotency_key: "k".into(),
            subject: Some("secret".into()),
            attempt: 1,
        };
        let events = [
            Event::InboundMessage {
                from: "+15550100".into(),
                to: "+15550199".into(),
                body: "secret".into(),
                provider_message_id: "m1".into(),
            },
            Event::OptOut {
                number: "+15550100".into(),
            },
        ];
        let request = WebhookRequest {
            method: "POST".into(),
            public_url: "http://x/".into(),
            remote_addr: None,
            headers: vec![],
            body: b"secret +15550100".to_vec(),
        };
        let texts = [
            format!("{outbound:?}"),
            format!("{events:?}"),
            format!("{request:?}"),
        ];
        for text in texts {
            assert!(!text.contains("1555") && !text.contains("secret"), "{text}");
        }
    }
}
