//! An SMS plugin built against the SDK frozen at ABI 1.0 (`../sdk-v1_0`): proof that
//! a plugin compiled before ABI 1.1 still loads and works in today's daemon.
//!
//! `send` answers sent with ids `v10-1`, `v10-2`, ...; a POST to its hook with the
//! JSON `{"from","to","body","id"}` is an inbound message; `health` is down while the
//! file named by `health_file` (if configured) holds the word `down`, so a test can
//! turn it down and up again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use caremsg_plugin_sdk::{
    EmitStatus, Event, Gateway, Health, Host, Kind, Outbound, SendResult, WebhookEvents,
    WebhookRequest, WebhookResponse, export_plugin,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    health_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct Inbound {
    from: String,
    to: String,
    body: String,
    id: String,
}

/// The ABI 1.0 plugin.
#[derive(Debug)]
pub struct V10 {
    host: Host,
    health_file: Option<PathBuf>,
    next: AtomicU64,
}

impl Gateway for V10 {
    fn start(config: &str, host: Host) -> Result<Self, String> {
        let config: Config =
            serde_json::from_str(config).map_err(|e| format!("Invalid configuration: {e}."))?;
        Ok(V10 {
            host,
            health_file: config.health_file,
            next: AtomicU64::new(1),
        })
    }

    fn send(&self, message: &Outbound<'_>) -> SendResult {
        let id = format!("v10-{}", self.next.fetch_add(1, Ordering::Relaxed));
        self.host
            .info(&format!("Delivery {} sent as {id}.", message.delivery_id));
        SendResult::sent(id)
    }

    fn handle_webhook(
        &self,
        request: &WebhookRequest<'_>,
        events: &mut WebhookEvents<'_>,
    ) -> WebhookResponse {
        if request.method != "POST" {
            return WebhookResponse::empty(405).with_header("allow", "POST");
        }
        let Ok(inbound) = serde_json::from_slice::<Inbound>(request.body) else {
            return WebhookResponse::text(400, "Expected {\"from\",\"to\",\"body\",\"id\"}.");
        };
        let event = Event::InboundMessage {
            from: &inbound.from,
            to: &inbound.to,
            body: &inbound.body,
            provider_message_id: &inbound.id,
        };
        match events.emit(&event) {
            EmitStatus::Accepted => WebhookResponse::empty(204),
            EmitStatus::Busy | EmitStatus::Rejected => {
                WebhookResponse::empty(503).with_header("retry-after", "1")
            }
        }
    }

    fn health(&self) -> Health {
        let down = self
            .health_file
            .as_ref()
            .and_then(|file| std::fs::read_to_string(file).ok())
            .is_some_and(|text| text.contains("down"));
        if down {
            Health::Down("The health file says down.".to_owned())
        } else {
            Health::Ok
        }
    }
}

export_plugin!(V10, "abi-v1-0", env!("CARGO_PKG_VERSION"), Kind::Sms);
