//! Telnyx Messaging API v2 for caremsg.
//!
//! - **Send**: `POST {base_url}/v2/messages` with `Authorization: Bearer {api_key}` and
//!   a JSON body (`from`, `to`, `text`, optional `messaging_profile_id`, and
//!   `webhook_url` = the instance's hook URL from the host, so status webhooks come
//!   back to this instance). `data.id` of the answer is the provider id.
//! - **Errors**: 429 → retryable with `Retry-After`; error code 40300 (blocked after
//!   STOP) → unsubscribed; 408 and 5xx → retryable; any other 4xx → permanent with
//!   Telnyx's first error code (or the status). 401 also marks the instance down.
//! - **Webhooks** (`POST /v1/hooks/{instance}`): verified with
//!   `telnyx-signature-ed25519` (base64) over `"{telnyx-timestamp}|{raw body}"`
//!   against the account's public key; a timestamp more than 5 minutes from the
//!   host's clock is refused (403). `message.received` → inbound message;
//!   `message.sent` → sent; `message.finalized` → delivered, failed or undelivered
//!   (and, for error 40300, an opt-out of the recipient). Other events are
//!   acknowledged and ignored.
//!
//! Configuration (the `[gateways.config]` table):
//! `{"api_key": "KEY…", "public_key": "<base64 Ed25519>", "from": "+15550199",
//!   "messaging_profile_id": "…" (optional), "base_url": "https://api.telnyx.com" (default),
//!   "status_webhooks": true (default)}`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use caremsg_plugin_sdk::{
    Event, Gateway, Health, Host, HttpRequest, Kind, Outbound, ReceiptStatus, SendResult,
    WebhookEvents, WebhookRequest, WebhookResponse, export_plugin, redact, verify,
};
use serde::Deserialize;
use serde_json::Value;

/// Telnyx's code for "blocked: the recipient replied STOP to this sender".
pub const OPTED_OUT: &str = "40300";
/// How old (or how far ahead) a webhook's timestamp may be.
pub const WINDOW: Duration = Duration::from_secs(300);
/// How much of Telnyx's error text a reason keeps.
const MAX_DETAIL: usize = 200;

/// The instance's settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The API v2 key (a Bearer token).
    api_key: String,
    /// The account's Ed25519 public key (base64), which signs webhooks.
    public_key: String,
    /// The sending number (E.164), used when a message names none.
    from: String,
    /// Optional messaging profile.
    #[serde(default)]
    messaging_profile_id: Option<String>,
    /// The API's base URL.
    #[serde(default = "default_base_url")]
    base_url: String,
    /// Whether each message asks for status webhooks at this instance's hook URL.
    #[serde(default = "default_true")]
    status_webhooks: bool,
}

fn default_base_url() -> String {
    "https://api.telnyx.com".to_owned()
}

fn default_true() -> bool {
    true
}

/// A running Telnyx instance.
pub struct Telnyx {
    host: Host,
    config: Config,
    /// The decoded public key.
    public_key: Vec<u8>,
    /// Set when Telnyx answered 401: the key was revoked or is wrong.
    credentials_refused: AtomicBool,
}

impl Gateway for Telnyx {
    fn start(config: &str, host: Host) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config)
            .map_err(|e| format!("Invalid sms-telnyx configuration: {e}."))?;
        if config.api_key.trim().is_empty() || config.from.trim().is_empty() {
            return Err("sms-telnyx needs a non-empty api_key and from.".to_owned());
        }
        let public_key = verify::base64(&config.public_key)
            .filter(|key| key.len() == 32)
            .ok_or("sms-telnyx: public_key must be the base64 of a 32-byte Ed25519 key.")?;
        if !config.base_url.starts_with("http://") && !config.base_url.starts_with("https://") {
            return Err("sms-telnyx: base_url must be an http or https URL.".to_owned());
        }
        Ok(Telnyx {
            host,
            config,
            public_key,
            credentials_refused: AtomicBool::new(false),
        })
    }

    fn send(&self, message: &Outbound<'_>) -> SendResult {
        let from = if message.from.is_empty() {
            self.config.from.as_str()
        } else {
            message.from
        };
        let mut body = serde_json::json!({ "from": from, "to": message.to, "text": message.body });
        if let Some(profile) = &self.config.messaging_profile_id {
            body["messaging_profile_id"] = Value::from(profile.as_str());
        }
        if self.config.status_webhooks
            && let Some(url) = self.host.hook_url()
        {
            body["webhook_url"] = Value::from(url);
        }
        let (url, auth) = (
            format!("{}/v2/messages", self.config.base_url.trim_end_matches('/')),
            format!("Bearer {}", self.config.api_key),
        );
        let body = body.to_string();
        let request = HttpRequest {
            method: "POST",
            url: &url,
            headers: &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
                ("accept", "application/json"),
            ],
            body: body.as_bytes(),
            timeout: Some(Duration::from_secs(15)),
        };
        let response = match self.host.http(&request) {
            Ok(response) => response,
            Err(error) => {
                return SendResult::retryable(format!("Telnyx could not be reached: {error}"));
            }
        };
        self.credentials_refused
            .store(response.status == 401, Ordering::Relaxed);
        let result = map_answer(
            response.status,
            response.header("retry-after"),
            &response.body,
        );
        if let SendResult::Sent { provider_id } = &result {
            self.host.info(&format!(
                "Telnyx accepted delivery {} as {provider_id}.",
                message.delivery_id
            ));
        }
        result
    }

    fn handle_webhook(
        &self,
        request: &WebhookRequest<'_>,
        events: &mut WebhookEvents<'_>,
    ) -> WebhookResponse {
        if request.method != "POST" {
            return WebhookResponse::empty(405).with_header("allow", "POST");
        }
        if let Err(why) = self.authentic(request) {
            self.host
                .warn(&format!("A Telnyx webhook was refused: {why}."));
            return WebhookResponse::text(403, "The signature is missing, wrong or stale.");
        }
        let Ok(document) = serde_json::from_slice::<Value>(request.body) else {
            return WebhookResponse::text(400, "The body must be a Telnyx JSON event.");
        };
        let data = &document["data"];
        let payload = &data["payload"];
        let id = payload["id"].as_str().unwrap_or_default();
        let to = payload["to"][0]["phone_number"]
            .as_str()
            .unwrap_or_default();
        let code = payload["errors"][0]["code"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| payload["errors"][0]["code"].as_u64().map(|c| c.to_string()));
        let receipt = |status| Event::DeliveryReceipt {
            provider_message_id: id,
            status,
            error_code: code.as_deref(),
        };
        let mut found = Vec::new();
        match data["event_type"].as_str().unwrap_or_default() {
            "message.received" => found.push(Event::InboundMessage {
                from: payload["from"]["phone_number"].as_str().unwrap_or_default(),
                to,
                body: payload["text"].as_str().unwrap_or_default(),
                provider_message_id: id,
            }),
            "message.sent" => found.push(receipt(ReceiptStatus::Sent)),
            "message.finalized" => {
                match payload["to"][0]["status"].as_str().unwrap_or_default() {
                    "delivered" => found.push(receipt(ReceiptStatus::Delivered)),
                    "sending_failed" => found.push(receipt(ReceiptStatus::Failed)),
                    "delivery_failed" => found.push(receipt(ReceiptStatus::Undelivered)),
                    _ => {}
                }
                if code.as_deref() == Some(OPTED_OUT) && !to.is_empty() {
                    found.push(Event::OptOut { number: to });
                }
            }
            _ => {}
        }
        if id.is_empty() && !found.is_empty() {
            return WebhookResponse::text(400, "The event names no message id.");
        }
        match events.emit_all(&found) {
            Ok(()) => WebhookResponse::empty(200),
            Err(busy) => busy,
        }
    }

    fn health(&self) -> Health {
        if self.credentials_refused.load(Ordering::Relaxed) {
            Health::Down("Telnyx refused the API key on the last send (HTTP 401).".to_owned())
        } else {
            Health::Ok
        }
    }
}

impl Telnyx {
    /// Checks the timestamp window, then the Ed25519 signature over `"{ts}|{body}"`.
    fn authentic(&self, request: &WebhookRequest<'_>) -> Result<(), String> {
        let timestamp = request
            .headers
            .get_str("telnyx-timestamp")
            .ok_or("no telnyx-timestamp header")?;
        verify::check_timestamp(timestamp, self.host.now(), WINDOW).map_err(|e| e.to_string())?;
        let signature = request
            .headers
            .get_str("telnyx-signature-ed25519")
            .and_then(verify::base64)
            .ok_or("no base64 telnyx-signature-ed25519 header")?;
        let message = [timestamp.as_bytes(), b"|", request.body];
        if verify::ed25519(&self.public_key, &message, &signature) {
            Ok(())
        } else {
            Err("the signature does not match".to_owned())
        }
    }
}

/// Maps Telnyx's answer to a send: `status` is the HTTP status, `retry_after` the
/// header, `body` the JSON document.
pub fn map_answer(status: u16, retry_after: Option<&str>, body: &[u8]) -> SendResult {
    let document: Value = serde_json::from_slice(body).unwrap_or_default();
    if (200..300).contains(&status) {
        return match document["data"]["id"].as_str().map(str::trim) {
            Some(id) if !id.is_empty() => SendResult::sent(id),
            _ => SendResult::permanent(
                "telnyx-malformed-response",
                format!(
                    "Telnyx answered HTTP {status} without a message id; the message may have been sent, so it is not retried."
                ),
            ),
        };
    }
    let error = &document["errors"][0];
    let code = error["code"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| error["code"].as_u64().map(|c| c.to_string()));
    let detail = error["detail"]
        .as_str()
        .or(error["title"].as_str())
        .unwrap_or("no detail");
    let reason = format!(
        "Telnyx answered HTTP {status} with error {}: {}",
        code.as_deref().unwrap_or("(none)"),
        redact::scrub(detail, MAX_DETAIL)
    );
    let after = retry_after
        .and_then(|s| s.trim().parse().ok())
        .map(Duration::from_secs);
    let code_or_status = code.clone().unwrap_or_else(|| status.to_string());
    match status {
        _ if code.as_deref() == Some(OPTED_OUT) => SendResult::unsubscribed(reason),
        429 | 408 | 500..=599 => SendResult::Retryable {
            after,
            code: Some(code_or_status),
            reason,
        },
        400..=499 => SendResult::permanent(code_or_status, reason),
        _ => SendResult::permanent(format!("http-{status}"), reason),
    }
}

export_plugin!(Telnyx, "sms-telnyx", env!("CARGO_PKG_VERSION"), Kind::Sms);
