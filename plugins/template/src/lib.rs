//! `sms-template`: the smallest useful SMS gateway, as a starting point.
//!
//! - `send` POSTs `{"from","to","text","callback"}` (JSON) to `{base_url}/messages`
//!   with `Authorization: Bearer {api_key}` through the host's HTTP service; the
//!   answer's `id` is the provider id. 429 and 5xx are retryable, other 4xx permanent.
//!   `callback` is this instance's hook (`Host::hook_url`).
//! - A webhook is `POST` JSON `{"type":"inbound"|"delivered","id","from","to","text"}`
//!   signed with `X-Signature: hex(HMAC-SHA256(secret, "{X-Timestamp}.{body}"))`;
//!   a timestamp more than 5 minutes from the host's clock is refused.
//!
//! Configuration: `{"api_key": "…", "secret": "…", "from": "+15550100",
//! "base_url": "https://sms.example"}`. Its `testkit.json` runs the battery.

use std::time::Duration;

use caremsg_plugin_sdk::{
    Event, Gateway, Host, HttpRequest, Kind, Outbound, ReceiptStatus, SendResult, WebhookEvents,
    WebhookRequest, WebhookResponse, export_plugin, verify,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    api_key: String,
    secret: String,
    from: String,
    base_url: String,
}

#[derive(Debug, Deserialize)]
struct Hook {
    r#type: String,
    id: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    text: String,
}

/// A running instance.
pub struct Template {
    host: Host,
    config: Config,
}

impl Gateway for Template {
    fn start(config: &str, host: Host) -> Result<Self, String> {
        let config: Config =
            serde_json::from_str(config).map_err(|e| format!("Invalid configuration: {e}."))?;
        Ok(Template { host, config })
    }

    fn send(&self, message: &Outbound<'_>) -> SendResult {
        let from = if message.from.is_empty() {
            &self.config.from
        } else {
            message.from
        };
        let body = serde_json::json!({
            "from": from, "to": message.to, "text": message.body, "callback": self.host.hook_url(),
        })
        .to_string();
        let (url, auth) = (
            format!("{}/messages", self.config.base_url),
            format!("Bearer {}", self.config.api_key),
        );
        let request = HttpRequest {
            method: "POST",
            url: &url,
            headers: &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            body: body.as_bytes(),
            timeout: Some(Duration::from_secs(10)),
        };
        let response = match self.host.http(&request) {
            Ok(response) => response,
            Err(error) => return SendResult::retryable(format!("Unreachable: {error}")),
        };
        let answer: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
        match (response.status, answer["id"].as_str()) {
            (200..=299, Some(id)) => SendResult::sent(id),
            (200..=299, None) => SendResult::permanent("malformed", "No id in the answer."),
            (429 | 500..=599, _) => SendResult::Retryable {
                after: response
                    .header("retry-after")
                    .and_then(|s| s.parse().ok())
                    .map(Duration::from_secs),
                code: Some(response.status.to_string()),
                reason: format!("The provider answered {}.", response.status),
            },
            (status, _) => SendResult::permanent(status.to_string(), "The provider refused it."),
        }
    }

    fn handle_webhook(
        &self,
        request: &WebhookRequest<'_>,
        events: &mut WebhookEvents<'_>,
    ) -> WebhookResponse {
        if request.method != "POST" {
            return WebhookResponse::empty(405).with_header("allow", "POST");
        }
        let timestamp = request.headers.get_str("x-timestamp").unwrap_or_default();
        let fresh = verify::check_timestamp(timestamp, self.host.now(), Duration::from_secs(300));
        let signature = request
            .headers
            .get_str("x-signature")
            .and_then(verify::hex)
            .unwrap_or_default();
        let message = [timestamp.as_bytes(), b".", request.body];
        if fresh.is_err()
            || !verify::hmac_sha256_matches(self.config.secret.as_bytes(), &message, &signature)
        {
            return WebhookResponse::text(403, "Bad or stale signature.");
        }
        let Ok(hook) = serde_json::from_slice::<Hook>(request.body) else {
            return WebhookResponse::text(400, "Expected a JSON event.");
        };
        let event = match hook.r#type.as_str() {
            "inbound" => Event::InboundMessage {
                from: &hook.from,
                to: &hook.to,
                body: &hook.text,
                provider_message_id: &hook.id,
            },
            "delivered" => Event::DeliveryReceipt {
                provider_message_id: &hook.id,
                status: ReceiptStatus::Delivered,
                error_code: None,
            },
            _ => return WebhookResponse::empty(204),
        };
        match events.emit_all([&event]) {
            Ok(()) => WebhookResponse::empty(204),
            Err(busy) => busy,
        }
    }
}

export_plugin!(
    Template,
    "sms-template",
    env!("CARGO_PKG_VERSION"),
    Kind::Sms
);
