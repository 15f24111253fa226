//! A plugin that panics in `send` and in `handle_webhook`, with fake patient data in
//! the panic messages (the SDK must neither let the panic cross the boundary nor
//! print or return the message).

use caremsg_plugin_sdk::{
    Gateway, Host, Kind, Outbound, SendResult, WebhookEvents, WebhookRequest, WebhookResponse,
    export_plugin,
};

/// Starts fine, then panics on every send and webhook.
#[derive(Debug)]
pub struct BrokenPanics;

impl Gateway for BrokenPanics {
    fn start(config: &str, _host: Host) -> Result<Self, String> {
        if config.trim_start().starts_with('{') {
            Ok(BrokenPanics)
        } else {
            Err("The configuration must be a JSON object.".to_owned())
        }
    }

    #[allow(clippy::panic, reason = "this plugin exists to panic")]
    fn send(&self, _message: &Outbound<'_>) -> SendResult {
        panic!("broken-panics: send to +15550100 failed with body 'secret'");
    }

    #[allow(clippy::panic, reason = "this plugin exists to panic")]
    fn handle_webhook(
        &self,
        _request: &WebhookRequest<'_>,
        _events: &mut WebhookEvents<'_>,
    ) -> WebhookResponse {
        panic!("broken-panics: webhook from +15550100 with body 'secret'");
    }
}

export_plugin!(
    BrokenPanics,
    "broken-panics",
    env!("CARGO_PKG_VERSION"),
    Kind::Sms
);
