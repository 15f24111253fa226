//! `sms-twilio`: Twilio Programmable Messaging, on Twilio's own wire format.
//!
//! - **Outbound.** `send` POSTs a form (`To`, `From` or `MessagingServiceSid`, `Body`,
//!   and `StatusCallback` when status callbacks are on) to
//!   `{base_url}/2010-04-01/Accounts/{account_sid}/Messages.json` with HTTP basic
//!   authentication (account SID and auth token), through the daemon's HTTP service:
//!   the plugin carries no HTTP or TLS stack. The answer's `sid` is the provider id;
//!   errors map as [`api`] describes (21610 → the recipient unsubscribed, an opt-out
//!   for the daemon; 20429/429 and 5xx retryable; listed and other 4xx permanent).
//!   Twilio's Messages API takes no idempotency key, so a send whose answer was lost
//!   (a timeout) can only be retried or reconciled by the daemon.
//! - **Webhooks.** Inbound texts and status callbacks ([`webhook`]) must carry a valid
//!   `X-Twilio-Signature` ([`signature`]) over the daemon's public URL of the hook
//!   (with or without the scheme's default port) and the POSTed parameters; anything
//!   else gets 403 and reports nothing. Only POST is taken (405 otherwise).
//!
//! # Configuration (JSON)
//! ```json
//! {
//!   "account_sid": "AC0123456789abcdef0123456789abcdef",
//!   "auth_token": "…",
//!   "from": "+15550100",
//!   "messaging_service_sid": null,
//!   "base_url": "https://api.twilio.com",
//!   "status_callback": true
//! }
//! ```
//! - `account_sid` (required): letters and digits.
//! - `auth_token` (required): signs webhooks and authenticates sends. Never logged.
//! - `from` (optional): the sender when the daemon gives none.
//! - `messaging_service_sid` (optional): sent as `MessagingServiceSid`; Twilio then
//!   picks the sender from the service's pool, and `From` is sent only when the daemon
//!   names a sender. One of `from` and `messaging_service_sid` is required.
//! - `base_url` (default `https://api.twilio.com`): where the REST API is; tests point
//!   it at a loopback fake. Its host must be on the instance's allow-list.
//! - `status_callback` (default `false`): ask Twilio for delivery receipts, at this
//!   instance's hook (the daemon's `server.public_url` + `/v1/hooks/{instance}`,
//!   from `Host::hook_url`).
//! - `hook_url` (optional): another URL for the callbacks, when Twilio must reach the
//!   hook under a different name; a start-up warning says when it differs from the
//!   daemon's.

pub mod api;
pub mod signature;
pub mod webhook;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use caremsg_plugin_sdk::{
    Event, Gateway, Health, Host, HttpRequest, Kind, Outbound, SendResult, WebhookEvents,
    WebhookRequest, WebhookResponse, export_plugin, redact, sms, verify,
};
use serde::Deserialize;

use crate::webhook::{Report, classify, parse_form};

/// Twilio's production API.
pub const DEFAULT_BASE_URL: &str = "https://api.twilio.com";

/// The header Twilio signs webhooks with.
pub const SIGNATURE_HEADER: &str = "x-twilio-signature";

/// The answer to an inbound text: empty TwiML, so Twilio sends no reply of its own.
pub const EMPTY_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>";

/// A secret from the configuration; `Debug` never shows it.
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

fn default_base_url() -> String {
    DEFAULT_BASE_URL.to_owned()
}

/// The plugin's configuration (see the crate docs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The account SID (`AC…`).
    pub account_sid: String,
    /// The account's auth token.
    pub auth_token: Secret,
    /// Default sender.
    #[serde(default)]
    pub from: Option<String>,
    /// Messaging service SID (`MG…`).
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    /// Where the REST API is.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Whether to ask for status callbacks.
    #[serde(default)]
    pub status_callback: bool,
    /// The hook's public URL for `StatusCallback`; default: the daemon's.
    #[serde(default)]
    pub hook_url: Option<String>,
}

fn is_sid(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn is_http_url(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    (lower.starts_with("http://") && lower.len() > "http://".len())
        || (lower.starts_with("https://") && lower.len() > "https://".len())
}

impl Config {
    /// Parses and checks a configuration. Messages name fields, never values.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = serde_json::from_str(text).map_err(|e| {
            format!(
                "The sms-twilio configuration is invalid: {}.",
                redact::quoted_values(&e.to_string())
            )
        })?;
        if !is_sid(&config.account_sid) {
            return Err("account_sid must be Twilio's account SID (letters and digits).".into());
        }
        if config.auth_token.expose().trim().is_empty() {
            return Err("auth_token must not be empty.".into());
        }
        if !is_http_url(&config.base_url) {
            return Err("base_url must be an http:// or https:// URL.".into());
        }
        if config
            .messaging_service_sid
            .as_deref()
            .is_some_and(|s| !is_sid(s))
        {
            return Err("messaging_service_sid must be a SID (letters and digits).".into());
        }
        if config.from.as_deref().is_some_and(|f| f.trim().is_empty()) {
            return Err("from, when given, must not be empty.".into());
        }
        if config.from.is_none() && config.messaging_service_sid.is_none() {
            return Err("Set from (a sender number) or messaging_service_sid.".into());
        }
        if config
            .hook_url
            .as_deref()
            .is_some_and(|url| !is_http_url(url))
        {
            return Err("hook_url must be an http:// or https:// URL.".into());
        }
        Ok(config)
    }
}

/// The gateway.
#[derive(Debug)]
pub struct Twilio {
    /// For HTTP and log lines.
    host: Host,
    /// The settings.
    config: Config,
    /// `…/Messages.json`.
    messages_url: String,
    /// `Basic base64(sid:token)`.
    authorization: Secret,
    /// Set when Twilio refused the credentials, cleared by the next accepted send;
    /// `health` reports it, since every send will fail until the token is fixed.
    credentials_refused: AtomicBool,
}

impl Twilio {
    /// The sender fields: `From` and `MessagingServiceSid`.
    fn sender<'a>(&'a self, message: &'a Outbound<'_>) -> (Option<&'a str>, Option<&'a str>) {
        let given = Some(message.from).filter(|f| !f.trim().is_empty());
        match self.config.messaging_service_sid.as_deref() {
            Some(service) => (given, Some(service)),
            None => (given.or(self.config.from.as_deref()), None),
        }
    }

    fn verify(&self, request: &WebhookRequest<'_>, params: &[(String, String)]) -> bool {
        request
            .headers
            .get_str(SIGNATURE_HEADER)
            .is_some_and(|given| {
                signature::verify(
                    self.config.auth_token.expose(),
                    request.public_url,
                    params,
                    given.trim(),
                )
            })
    }
}

impl Gateway for Twilio {
    fn start(config: &str, host: Host) -> Result<Self, String> {
        let config = Config::parse(config)?;
        let messages_url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            config.base_url.trim_end_matches('/'),
            config.account_sid
        );
        let authorization = Secret(format!(
            "Basic {}",
            verify::to_base64(
                format!("{}:{}", config.account_sid, config.auth_token.expose()).as_bytes()
            )
        ));
        if let (Some(configured), Some(daemon)) = (config.hook_url.as_deref(), host.hook_url())
            && configured != daemon
        {
            host.warn(&format!(
                "hook_url differs from this instance's hook at the daemon's public URL \
                 ({daemon}): Twilio will sign and post status callbacks to the configured one."
            ));
        }
        Ok(Twilio {
            host,
            config,
            messages_url,
            authorization,
            credentials_refused: AtomicBool::new(false),
        })
    }

    fn send(&self, message: &Outbound<'_>) -> SendResult {
        let (from, messaging_service_sid) = self.sender(message);
        let hook_url = match &self.config.hook_url {
            _ if !self.config.status_callback => None,
            Some(configured) => Some(configured.clone()),
            None => self.host.hook_url(),
        };
        let form = api::Form {
            to: message.to,
            from,
            messaging_service_sid,
            body: message.body,
            status_callback: hook_url.as_deref(),
        }
        .encode();
        let headers = [
            ("content-type", "application/x-www-form-urlencoded"),
            ("accept", "application/json"),
            ("authorization", self.authorization.expose()),
        ];
        let request = HttpRequest {
            method: "POST",
            url: &self.messages_url,
            headers: &headers,
            body: form.as_bytes(),
            timeout: None,
        };
        let response = match self.host.http(&request) {
            Ok(response) => response,
            Err(error) => {
                let reason = format!(
                    "Twilio could not be reached: {}",
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
        let mapped = api::map_answer(
            response.status,
            response.header("retry-after"),
            &response.body,
        );
        if mapped.credentials_refused {
            if !self.credentials_refused.swap(true, Ordering::Relaxed) {
                self.host.error(
                    "Twilio refused the account SID and auth token (HTTP 401 / error 20003): \
                     every send will fail until the configuration is fixed.",
                );
            }
        } else if matches!(mapped.result, SendResult::Sent { .. }) {
            self.credentials_refused.store(false, Ordering::Relaxed);
        }
        match &mapped.result {
            SendResult::Sent { provider_id } => self.host.info(&format!(
                "Delivery {} accepted by Twilio as {provider_id} (status {}, {} segment(s)).",
                message.delivery_id,
                mapped.status.as_deref().unwrap_or("unknown"),
                sms::segments(message.body).count
            )),
            SendResult::Retryable { code, after, .. } => self.host.warn(&format!(
                "Delivery {}: Twilio asked to retry (HTTP {}, code {}, after {after:?}).",
                message.delivery_id,
                response.status,
                code.as_deref().unwrap_or("none")
            )),
            SendResult::Permanent { code, .. } => self.host.warn(&format!(
                "Delivery {}: Twilio refused it for good (HTTP {}, code {code}).",
                message.delivery_id, response.status
            )),
            SendResult::Unsubscribed { .. } => self.host.info(&format!(
                "Delivery {}: the recipient has unsubscribed at Twilio (error {}).",
                message.delivery_id,
                api::UNSUBSCRIBED
            )),
        }
        mapped.result
    }

    fn handle_webhook(
        &self,
        request: &WebhookRequest<'_>,
        events: &mut WebhookEvents<'_>,
    ) -> WebhookResponse {
        if request.method != "POST" {
            return WebhookResponse::text(405, "Use POST.").with_header("allow", "POST");
        }
        let params = parse_form(request.body);
        if !self.verify(request, &params) {
            self.host
                .warn("Refused a webhook without a valid X-Twilio-Signature.");
            return WebhookResponse::text(403, "The X-Twilio-Signature is missing or wrong.");
        }
        let report = match classify(&params) {
            Ok(report) => report,
            Err(webhook::Malformed(why)) => return WebhookResponse::text(400, why),
        };
        match report {
            Report::Inbound {
                sid,
                from,
                to,
                body,
            } => {
                let event = Event::InboundMessage {
                    from,
                    to,
                    body,
                    provider_message_id: sid,
                };
                if let Err(refused) = events.emit_all([&event]) {
                    return refused;
                }
                self.host.info(&format!("Inbound text {sid} received."));
                WebhookResponse::empty(200)
                    .with_header("content-type", "text/xml")
                    .with_body(EMPTY_TWIML)
            }
            Report::Status {
                sid,
                receipt,
                error_code,
                opted_out,
            } => {
                let mut emitted = Vec::new();
                if let Some(status) = receipt {
                    emitted.push(Event::DeliveryReceipt {
                        provider_message_id: sid,
                        status,
                        error_code,
                    });
                }
                if let Some(number) = opted_out {
                    emitted.push(Event::OptOut { number });
                }
                if let Err(refused) = events.emit_all(&emitted) {
                    return refused;
                }
                self.host.debug(&format!(
                    "Status callback for {sid}: {receipt:?}, error code {}.",
                    error_code.unwrap_or("none")
                ));
                WebhookResponse::empty(204)
            }
        }
    }

    fn health(&self) -> Health {
        if self.credentials_refused.load(Ordering::Relaxed) {
            Health::Down(
                "Twilio refused the account SID and auth token on the last send.".to_owned(),
            )
        } else {
            Health::Ok
        }
    }
}

export_plugin!(Twilio, "sms-twilio", env!("CARGO_PKG_VERSION"), Kind::Sms);

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn check(config: &str, expected: Result<(), &str>) {
        match (Config::parse(config), expected) {
            (Ok(_), Ok(())) => {}
            (Err(got), Err(fragment)) => assert!(got.contains(fragment), "{config}: {got}"),
            (got, expected) => panic!("{config}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn config_is_checked() {
        check(
            r#"{"account_sid":"AC1","auth_token":"t","from":"+15550100"}"#,
            Ok(()),
        );
        check(
            r#"{"account_sid":"AC1","auth_token":"t","messaging_service_sid":"MG1"}"#,
            Ok(()),
        );
        check(
            r#"{"account_sid":"AC1","auth_token":"t","from":"+1","status_callback":true,"hook_url":"https://x/v1/hooks/t"}"#,
            Ok(()),
        );
        check(r#"{"account_sid":"AC1","auth_token":"t"}"#, Err("from"));
        check(
            r#"{"account_sid":"AC/1","auth_token":"t","from":"+1"}"#,
            Err("account_sid"),
        );
        check(
            r#"{"account_sid":"","auth_token":"t","from":"+1"}"#,
            Err("account_sid"),
        );
        check(
            r#"{"account_sid":"AC1","auth_token":" ","from":"+1"}"#,
            Err("auth_token"),
        );
        check(
            r#"{"account_sid":"AC1","auth_token":"t","from":""}"#,
            Err("from"),
        );
        check(
            r#"{"account_sid":"AC1","auth_token":"t","from":"+1","base_url":"ftp://x"}"#,
            Err("base_url"),
        );
        // Without hook_url, status callbacks go to the daemon's hook URL (Host::hook_url).
        check(
            r#"{"account_sid":"AC1","auth_token":"t","from":"+1","status_callback":true}"#,
            Ok(()),
        );
        check(
            r#"{"account_sid":"AC1","auth_token":"t","from":"+1","hook_url":"/relative"}"#,
            Err("hook_url"),
        );
        check(
            r#"{"account_sid":"AC1","auth_token":"t","from":"+1","oops":1}"#,
            Err("unknown field `oops`"),
        );
        check("not json", Err("invalid"));
    }

    #[test]
    fn config_errors_and_debug_hide_the_token() {
        let error = Config::parse(
            r#"{"account_sid":"AC1","auth_token":"s3cret","status_callback":"s3cret"}"#,
        )
        .expect_err("invalid");
        assert!(!error.contains("s3cret"), "{error}");
        let config = Config::parse(r#"{"account_sid":"AC1","auth_token":"s3cret","from":"+1"}"#)
            .expect("ok");
        assert!(!format!("{config:?}").contains("s3cret"));
    }
}
