//! `sms-loopback`: the development SMS gateway, a simulated phone.
//!
//! - **Outbound.** Each `send` appends one JSON line
//!   `{"id","at","from","to","body","segments","delivery_id"}` to the file named by
//!   the config's `outbox` (parent folders are created) and returns the generated id
//!   (`lb-…`). `delivery_id` is caremsg's delivery id (the idempotency key), so an
//!   operator or a test can tell whether an interrupted send left the building. The
//!   daemon's log gets a line with the id and the segment count, never the number
//!   or the text.
//! - **Inbound.** A simulated reply is `POST /v1/hooks/{instance}` with
//!   `{"from","to","body","id"?}`. `id`, when given, is the provider message id (so a
//!   repeated request is recognised); otherwise one is generated. Only requests from
//!   127.0.0.0/8 or ::1 are taken (403 otherwise, and when the address is unknown,
//!   as on a Unix socket); other methods get 405, malformed JSON 400, and a busy
//!   daemon 503. Behind a reverse proxy on the same machine every request comes from
//!   127.0.0.1, so the config's optional `secret` must then also arrive in the
//!   `X-Caremsg-Loopback-Secret` header (compared in constant time; 403 otherwise).
//!
//! This plugin is for development: the production example configuration does not
//! enable it, the package does not ship it, and `caremsgd check-config` warns when it
//! is configured with a `server.public_url` that is not on loopback.
//!
//! Configuration (JSON): `{"outbox": "/var/lib/caremsg/loopback-outbox.jsonl",
//! "from": "+15550100", "secret": "…"}`; `from` (optional) is the sender written
//! when the daemon gives none, `secret` (optional) the shared secret of replies.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use caremsg_plugin_sdk::{
    EmitStatus, Event, Gateway, Host, Kind, Outbound, SendResult, WebhookEvents, WebhookRequest,
    WebhookResponse, export_plugin, sms, verify,
};
use serde::{Deserialize, Serialize};

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The JSON-lines file outbound texts are appended to.
    pub outbox: PathBuf,
    /// The sender written when the daemon gives none.
    #[serde(default)]
    pub from: Option<String>,
    /// When set, simulated replies must carry it in [`SECRET_HEADER`].
    #[serde(default)]
    pub secret: Option<String>,
}

/// The header that carries the shared secret of simulated replies.
pub const SECRET_HEADER: &str = "x-caremsg-loopback-secret";

/// One line of the outbox file.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutboxLine {
    /// The provider id `send` returned.
    pub id: String,
    /// When it was stored (RFC 3339, UTC).
    pub at: String,
    /// Sender.
    pub from: String,
    /// Recipient.
    pub to: String,
    /// Text.
    pub body: String,
    /// SMS segments it would take.
    pub segments: usize,
    /// caremsg's delivery id (the idempotency key of the send); empty in lines
    /// written before it was recorded.
    #[serde(default)]
    pub delivery_id: String,
}

/// A simulated reply posted to the hook.
#[derive(Debug, Deserialize)]
struct Reply {
    from: String,
    to: String,
    body: String,
    #[serde(default)]
    id: Option<String>,
}

/// The outbox file, shared by concurrent sends.
#[derive(Debug)]
pub struct Outbox {
    /// Where it is (not PHI; fine in error messages).
    path: PathBuf,
    /// The open file; the lock keeps each line whole.
    file: Mutex<File>,
}

impl Outbox {
    /// Opens (creating it and its folders) the file for appending.
    pub fn open(path: PathBuf) -> Result<Self, String> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                format!("Cannot create the outbox folder {}: {e}.", parent.display())
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("Cannot open the outbox file {}: {e}.", path.display()))?;
        Ok(Outbox {
            path,
            file: Mutex::new(file),
        })
    }

    /// Appends one line (one `write` call under the lock, so lines never interleave).
    pub fn append(&self, line: &OutboxLine) -> Result<(), String> {
        let mut text = serde_json::to_string(line)
            .map_err(|e| format!("Cannot encode the outbox line: {e}."))?;
        text.push('\n');
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        file.write_all(text.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| {
                format!(
                    "Cannot write to the outbox file {}: {e}.",
                    self.path.display()
                )
            })
    }
}

/// The gateway.
#[derive(Debug)]
pub struct Loopback {
    /// For log lines.
    host: Host,
    /// Where texts go.
    outbox: Outbox,
    /// Default sender.
    from: String,
    /// The shared secret replies must carry, if configured.
    secret: Option<String>,
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Checks a simulated reply: where it came from, its shared secret (when `secret`
/// is configured), its method and its JSON. Returns the reply, or the response that
/// refuses it.
fn accept_reply(
    request: &WebhookRequest<'_>,
    secret: Option<&str>,
) -> Result<Reply, WebhookResponse> {
    let refuse = |status: u16, error: &str| {
        WebhookResponse::json(status, serde_json::json!({ "error": error }).to_string())
    };
    if !request.is_from_loopback() {
        return Err(refuse(
            403,
            "Simulated replies are taken from this machine's loopback only.",
        ));
    }
    if let Some(secret) = secret {
        let given = request.headers.get(SECRET_HEADER).unwrap_or_default();
        if !verify::constant_time_eq(given, secret.as_bytes()) {
            return Err(refuse(
                403,
                "Simulated replies must carry the configured X-Caremsg-Loopback-Secret.",
            ));
        }
    }
    if request.method != "POST" {
        return Err(refuse(405, "Use POST.").with_header("allow", "POST"));
    }
    let reply: Reply = serde_json::from_slice(request.body).map_err(|_| {
        refuse(
            400,
            r#"The body must be JSON: {"from","to","body","id"?} (strings)."#,
        )
    })?;
    if reply.from.trim().is_empty() || reply.to.trim().is_empty() {
        return Err(refuse(400, "\"from\" and \"to\" must not be empty."));
    }
    if reply.id.as_deref().is_some_and(|id| id.trim().is_empty()) {
        return Err(refuse(400, "\"id\", when given, must not be empty."));
    }
    Ok(reply)
}

impl Gateway for Loopback {
    fn start(config: &str, host: Host) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config)
            .map_err(|e| format!("The sms-loopback configuration is invalid: {e}."))?;
        let outbox = Outbox::open(config.outbox)?;
        if config
            .secret
            .as_deref()
            .is_some_and(|s| s.trim().is_empty())
        {
            return Err("The sms-loopback secret, when given, must not be empty.".to_owned());
        }
        Ok(Loopback {
            host,
            outbox,
            from: config.from.unwrap_or_default(),
            secret: config.secret,
        })
    }

    fn send(&self, message: &Outbound<'_>) -> SendResult {
        let segments = sms::segments(message.body);
        let id = new_id("lb-");
        let from = if message.from.is_empty() {
            self.from.as_str()
        } else {
            message.from
        };
        let line = OutboxLine {
            id: id.clone(),
            at: now(),
            from: from.to_owned(),
            to: message.to.to_owned(),
            body: message.body.to_owned(),
            segments: segments.count,
            delivery_id: message.delivery_id.to_owned(),
        };
        if let Err(reason) = self.outbox.append(&line) {
            self.host.error(&reason);
            return SendResult::retryable(reason);
        }
        self.host.info(&format!(
            "Loopback text stored: id {id}, delivery {}, {} segment(s), {:?}.",
            message.delivery_id, segments.count, segments.encoding
        ));
        SendResult::sent(id)
    }

    fn handle_webhook(
        &self,
        request: &WebhookRequest<'_>,
        events: &mut WebhookEvents<'_>,
    ) -> WebhookResponse {
        let reply = match accept_reply(request, self.secret.as_deref()) {
            Ok(reply) => reply,
            Err(response) => return response,
        };
        let id = reply.id.unwrap_or_else(|| new_id("lbin-"));
        let event = Event::InboundMessage {
            from: &reply.from,
            to: &reply.to,
            body: &reply.body,
            provider_message_id: &id,
        };
        match events.emit(&event) {
            EmitStatus::Accepted => {
                self.host
                    .info(&format!("Loopback reply received: id {id}."));
                WebhookResponse::json(200, serde_json::json!({ "id": id }).to_string())
            }
            EmitStatus::Busy => {
                WebhookResponse::json(503, r#"{"error":"The daemon is busy; try again."}"#)
                    .with_header("retry-after", "1")
            }
            EmitStatus::Rejected => {
                WebhookResponse::json(500, r#"{"error":"The daemon refused the reply."}"#)
            }
        }
    }
}

export_plugin!(
    Loopback,
    "sms-loopback",
    env!("CARGO_PKG_VERSION"),
    Kind::Sms
);

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use caremsg_plugin_sdk::Headers;

    fn request<'a>(method: &'a str, remote: Option<&str>, body: &'a [u8]) -> WebhookRequest<'a> {
        WebhookRequest {
            method,
            public_url: "http://127.0.0.1:8080/v1/hooks/loopback",
            remote_addr: remote.map(|r| r.parse().expect("address")),
            headers: Headers::default(),
            body,
        }
    }

    fn check(method: &str, remote: Option<&str>, body: &str, expected: Result<Option<&str>, u16>) {
        let got = accept_reply(&request(method, remote, body.as_bytes()), None);
        match (got, expected) {
            (Ok(reply), Ok(id)) => assert_eq!(reply.id.as_deref(), id, "{body}"),
            (Err(response), Err(status)) => {
                assert_eq!(response.status, status, "{method} {remote:?} {body}")
            }
            (got, expected) => {
                panic!("{method} {remote:?} {body}: got {got:?}, expected {expected:?}")
            }
        }
    }

    const GOOD: &str = r#"{"from":"+15550100","to":"+15550199","body":"YES"}"#;

    #[test]
    fn replies_are_checked() {
        check("POST", Some("127.0.0.1:5000"), GOOD, Ok(None));
        check(
            "POST",
            Some("[::1]:5000"),
            r#"{"from":"a","to":"b","body":"","id":"x1"}"#,
            Ok(Some("x1")),
        );
        check("POST", Some("127.0.0.2:5000"), GOOD, Ok(None));
        check("POST", Some("192.0.2.1:5000"), GOOD, Err(403));
        check("POST", None, GOOD, Err(403));
        check("GET", Some("127.0.0.1:5000"), GOOD, Err(405));
        check("POST", Some("127.0.0.1:5000"), "not json", Err(400));
        check(
            "POST",
            Some("127.0.0.1:5000"),
            r#"{"from":"a","to":"b"}"#,
            Err(400),
        );
        check(
            "POST",
            Some("127.0.0.1:5000"),
            r#"{"from":"","to":"b","body":"x"}"#,
            Err(400),
        );
        check(
            "POST",
            Some("127.0.0.1:5000"),
            r#"{"from":"a","to":"b","body":"x","id":" "}"#,
            Err(400),
        );
    }

    #[test]
    fn a_configured_secret_is_required_even_from_loopback() {
        let block = |value: &[u8]| caremsg_plugin_sdk::headers::encode([(SECRET_HEADER, value)]);
        let (right, wrong) = (block(b"s3cret"), block(b"s3creT"));
        // (the header block, the configured secret, the expected outcome)
        type Case<'a> = (&'a [u8], Option<&'a str>, Result<(), u16>);
        let cases: [Case<'_>; 5] = [
            (&right, Some("s3cret"), Ok(())),
            (&wrong, Some("s3cret"), Err(403)),
            (&[], Some("s3cret"), Err(403)),
            (&[], None, Ok(())),
            (&wrong, None, Ok(())),
        ];
        for (headers, secret, expected) in cases {
            let request = WebhookRequest {
                headers: Headers::new(headers),
                ..request("POST", Some("127.0.0.1:5000"), GOOD.as_bytes())
            };
            let got = accept_reply(&request, secret)
                .map(|_| ())
                .map_err(|r| r.status);
            assert_eq!(got, expected, "{secret:?}");
        }
        let reverse_proxied = WebhookRequest {
            headers: Headers::new(&right),
            ..request("POST", Some("192.0.2.1:5000"), GOOD.as_bytes())
        };
        assert!(
            accept_reply(&reverse_proxied, Some("s3cret")).is_err(),
            "the secret does not replace the loopback check"
        );
    }

    #[test]
    fn refusal_does_not_echo_the_body() {
        let body = r#"{"from":"+15550100","to":5}"#;
        let response = accept_reply(&request("POST", Some("127.0.0.1:1"), body.as_bytes()), None)
            .expect_err("refused");
        assert!(!String::from_utf8_lossy(&response.body).contains("1555"));
    }

    #[test]
    fn outbox_appends_whole_lines_and_creates_folders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/b/outbox.jsonl");
        let outbox = Outbox::open(path.clone()).expect("open");
        let line = |i: usize| OutboxLine {
            id: format!("lb-{i}"),
            at: now(),
            from: "+15550100".into(),
            to: "+15550199".into(),
            body: "x".repeat(i),
            segments: 1,
            delivery_id: format!("d-{i}"),
        };
        std::thread::scope(|scope| {
            for i in 0..20 {
                let outbox = &outbox;
                scope.spawn(move || outbox.append(&line(i)).expect("append"));
            }
        });
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<OutboxLine> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a whole JSON line"))
            .collect();
        assert_eq!(lines.len(), 20);
        let mut ids: Vec<&str> = lines.iter().map(|l| l.delivery_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 20, "each line carries its delivery id");
    }

    #[test]
    fn config_is_strict() {
        assert!(serde_json::from_str::<Config>(r#"{"outbox":"x.jsonl"}"#).is_ok());
        assert!(serde_json::from_str::<Config>(r#"{"outbox":"x.jsonl","oops":1}"#).is_err());
        assert!(serde_json::from_str::<Config>("{}").is_err());
        assert!(serde_json::from_str::<Config>(r#"{"outbox":"x.jsonl","secret":"s"}"#).is_ok());
    }
}
