//! A minimal HTTP gateway for tests: `send` POSTs `{"to","body"}` to the configured
//! `url` through the host's `http` service and maps the answer the way real
//! provider plugins do: 2xx → sent (the body is the provider id), 429 → retryable
//! with `Retry-After`, 5xx → retryable, 410 → unsubscribed, other 4xx → permanent
//! with the status as the code. A transport error is retryable.

use std::time::Duration;

use caremsg_plugin_sdk::{Gateway, Host, HttpRequest, Kind, Outbound, SendResult, export_plugin};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    url: String,
}

/// Sends through the host's HTTP service.
#[derive(Debug)]
pub struct HttpStatus {
    host: Host,
    url: String,
}

impl Gateway for HttpStatus {
    fn start(config: &str, host: Host) -> Result<Self, String> {
        let config: Config =
            serde_json::from_str(config).map_err(|e| format!("Invalid configuration: {e}."))?;
        Ok(HttpStatus {
            host,
            url: config.url,
        })
    }

    fn send(&self, message: &Outbound<'_>) -> SendResult {
        let body = serde_json::json!({ "to": message.to, "body": message.body }).to_string();
        let request = HttpRequest {
            method: "POST",
            url: &self.url,
            headers: &[
                ("content-type", "application/json"),
                ("idempotency-key", message.idempotency_key),
            ],
            body: body.as_bytes(),
            timeout: Some(Duration::from_secs(5)),
        };
        let response = match self.host.http(&request) {
            Ok(response) => response,
            Err(error) => {
                return SendResult::retryable(format!(
                    "The provider could not be reached: {error}"
                ));
            }
        };
        match response.status {
            200..=299 => {
                SendResult::sent(String::from_utf8_lossy(&response.body).trim().to_owned())
            }
            429 => SendResult::Retryable {
                after: response
                    .header("retry-after")
                    .and_then(|s| s.parse().ok())
                    .map(Duration::from_secs),
                code: Some("429".to_owned()),
                reason: "The provider is rate limiting.".to_owned(),
            },
            410 => SendResult::unsubscribed("The recipient unsubscribed."),
            500..=599 => {
                SendResult::retryable(format!("The provider answered {}.", response.status))
            }
            status => {
                SendResult::permanent(status.to_string(), "The provider refused the message.")
            }
        }
    }
}

export_plugin!(
    HttpStatus,
    "http-status",
    env!("CARGO_PKG_VERSION"),
    Kind::Sms
);
