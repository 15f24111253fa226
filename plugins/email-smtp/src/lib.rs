//! `email-smtp`: sends e-mail over SMTP with lettre's blocking transport (plugin calls
//! run on the daemon's blocking threads, one SMTP connection per send).
//!
//! - **Message.** `To` is the delivery's recipient, `From` the daemon's sender when it
//!   gives one, else the configured `from`; `Subject` the delivery's subject, else the
//!   configured `default_subject`; the body is `text/plain; charset=utf-8`, encoded by
//!   lettre (7bit, quoted-printable or base64 as the text needs). The `Message-ID` is
//!   derived from the delivery's idempotency key (`<key@from-domain>`), so a retry of
//!   one delivery carries the same id, and it is the provider id `send` returns.
//! - **Security.** `starttls` (default; STARTTLS is required, never skipped), `tls`
//!   (implicit TLS, "SMTPS") or `none` (plain text; credentials are then refused unless
//!   the server is on loopback). TLS is rustls with the Mozilla (webpki) roots, plus
//!   the PEM certificates of `root_certificates` for a private CA.
//! - **Errors.** [`mapping`]: 4xx replies retryable, 5xx permanent with the reply code,
//!   connection trouble retryable. A send whose final reply was lost may be retried
//!   by the daemon; the stable `Message-ID` lets mail clients drop the duplicate.
//!
//! # Configuration (JSON)
//! ```json
//! {"host": "smtp.example.org", "port": 587, "security": "starttls",
//!  "username": "clinic", "password": "…", "from": "Sunrise Clinic <care@sunrise.example>",
//!  "default_subject": "A message from your care team", "timeout_secs": 30,
//!  "root_certificates": "/etc/caremsg/smtp-ca.pem", "hello_name": "caremsg.sunrise.example"}
//! ```
//! - `host` (required); `port` (default 587 for `starttls`, 465 for `tls`, 25 for `none`).
//! - `security`: `starttls` | `tls` | `none` (default `starttls`).
//! - `username` and `password`: both or neither; AUTH PLAIN or LOGIN, as offered.
//! - `from` (required): an address, optionally with a display name.
//! - `default_subject` (default `A message from your care team`): used when the delivery
//!   has no subject. Keep it free of PHI.
//! - `timeout_secs` (default 30): for each network step of a send.
//! - `root_certificates` (optional): a PEM file of CA certificates trusted in addition
//!   to the public roots.
//! - `hello_name` (optional): the EHLO name; default: this machine's host name.

pub mod mapping;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use caremsg_plugin_sdk::{
    Gateway, Health, Host, Kind, Outbound, SendResult, export_plugin, redact,
};
use lettre::Transport;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::SmtpTransport;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use serde::Deserialize;

/// How the connection is protected.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Plain connection upgraded with STARTTLS, which must succeed.
    #[default]
    Starttls,
    /// TLS from the first byte ("SMTPS").
    Tls,
    /// No encryption.
    None,
}

impl Security {
    /// The usual port.
    pub const fn default_port(self) -> u16 {
        match self {
            Security::Starttls => 587,
            Security::Tls => 465,
            Security::None => 25,
        }
    }
}

/// The SMTP password; `Debug` never shows it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

fn default_subject() -> String {
    "A message from your care team".to_owned()
}

fn default_timeout_secs() -> u64 {
    30
}

/// The plugin's configuration (see the crate docs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The SMTP server.
    pub host: String,
    /// Its port; default by `security`.
    #[serde(default)]
    pub port: Option<u16>,
    /// How the connection is protected.
    #[serde(default)]
    pub security: Security,
    /// SMTP user name.
    #[serde(default)]
    pub username: Option<String>,
    /// SMTP password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// The sender address.
    pub from: String,
    /// Subject of deliveries without one.
    #[serde(default = "default_subject")]
    pub default_subject: String,
    /// Timeout of each network step, in seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Extra trusted CA certificates (PEM).
    #[serde(default)]
    pub root_certificates: Option<PathBuf>,
    /// The EHLO name.
    #[serde(default)]
    pub hello_name: Option<String>,
}

fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Reads the PEM certificates of `path` (one or more).
fn read_certificates(path: &PathBuf) -> Result<Vec<Certificate>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("Cannot read root_certificates {}: {e}.", path.display()))?;
    const END: &str = "-----END CERTIFICATE-----";
    let certificates: Vec<Certificate> = text
        .split_inclusive(END)
        .filter(|block| block.contains("-----BEGIN CERTIFICATE-----"))
        .map(|block| {
            Certificate::from_pem(block.trim().as_bytes()).map_err(|e| {
                format!(
                    "root_certificates {} holds an unreadable certificate: {e}.",
                    path.display()
                )
            })
        })
        .collect::<Result<_, _>>()?;
    if certificates.is_empty() {
        return Err(format!(
            "root_certificates {} holds no PEM certificate.",
            path.display()
        ));
    }
    Ok(certificates)
}

impl Config {
    /// Parses and checks a configuration. Messages name fields, never secrets.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = serde_json::from_str(text).map_err(|e| {
            format!(
                "The email-smtp configuration is invalid: {}.",
                redact::quoted_values(&e.to_string())
            )
        })?;
        if config.host.trim().is_empty() {
            return Err("host must not be empty.".into());
        }
        if config.port == Some(0) {
            return Err("port must not be 0.".into());
        }
        if config.username.is_some() != config.password.is_some() {
            return Err("Give both username and password, or neither.".into());
        }
        if config.username.is_some()
            && config.security == Security::None
            && !is_loopback_host(&config.host)
        {
            return Err(
                "security \"none\" would send the password in clear text: use starttls or tls, \
                 or a server on loopback."
                    .into(),
            );
        }
        if config.from.parse::<Mailbox>().is_err() {
            return Err(
                "from must be an e-mail address, such as \"Clinic <care@clinic.example>\".".into(),
            );
        }
        if config.default_subject.trim().is_empty() {
            return Err("default_subject must not be empty.".into());
        }
        if config.timeout_secs == 0 {
            return Err("timeout_secs must be at least 1.".into());
        }
        Ok(config)
    }

    /// The transport this configuration describes (no connection is made yet).
    pub fn transport(&self) -> Result<SmtpTransport, String> {
        let tls = match self.security {
            Security::None => Tls::None,
            Security::Starttls | Security::Tls => {
                let mut builder = TlsParameters::builder(self.host.clone());
                if let Some(path) = &self.root_certificates {
                    for certificate in read_certificates(path)? {
                        builder = builder.add_root_certificate(certificate);
                    }
                }
                let parameters = builder
                    .build_rustls()
                    .map_err(|e| format!("Cannot set up TLS for {}: {e}.", self.host))?;
                if self.security == Security::Tls {
                    Tls::Wrapper(parameters)
                } else {
                    Tls::Required(parameters)
                }
            }
        };
        let mut builder = SmtpTransport::builder_dangerous(self.host.clone())
            .port(self.port.unwrap_or(self.security.default_port()))
            .tls(tls)
            .timeout(Some(Duration::from_secs(self.timeout_secs)));
        if let (Some(username), Some(password)) = (&self.username, &self.password) {
            builder = builder.credentials(Credentials::new(username.clone(), password.0.clone()));
        }
        if let Some(name) = &self.hello_name {
            builder = builder.hello_name(ClientId::Domain(name.clone()));
        }
        Ok(builder.build())
    }
}

/// The part of a Message-ID left of `@`: the idempotency key's safe characters (so
/// every attempt of one delivery has the same id), else the delivery id's.
pub fn message_id_local_part(idempotency_key: &str, delivery_id: &str) -> String {
    let safe = |text: &str| -> String {
        text.chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            .take(64)
            .collect::<String>()
            .trim_matches('.')
            .to_owned()
    };
    let key = safe(idempotency_key);
    if !key.is_empty() {
        return key;
    }
    let delivery = safe(delivery_id);
    if delivery.is_empty() {
        "caremsg".to_owned()
    } else {
        delivery
    }
}

/// Header text without line breaks or other control characters.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Why a message could not be built (a permanent failure).
#[derive(Debug, PartialEq, Eq)]
pub struct Unbuildable {
    /// A stable code.
    pub code: &'static str,
    /// Why, without PHI.
    pub reason: &'static str,
}

/// Builds the message for `outbound`; returns it with its Message-ID (no brackets).
pub fn build_message(
    config: &Config,
    default_from: &Mailbox,
    outbound: &Outbound<'_>,
) -> Result<(Message, String), Unbuildable> {
    let to: Mailbox = outbound.to.trim().parse().map_err(|_| Unbuildable {
        code: "invalid-recipient",
        reason: "The recipient is not an e-mail address.",
    })?;
    let from: Mailbox = if outbound.from.trim().is_empty() {
        default_from.clone()
    } else {
        outbound.from.trim().parse().map_err(|_| Unbuildable {
            code: "invalid-sender",
            reason: "The sender the daemon gave is not an e-mail address.",
        })?
    };
    let subject = outbound
        .subject
        .map(one_line)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| one_line(&config.default_subject));
    let id = format!(
        "{}@{}",
        message_id_local_part(outbound.idempotency_key, outbound.delivery_id),
        from.email.domain()
    );
    let message = Message::builder()
        .from(from)
        .to(to)
        .subject(subject)
        .message_id(Some(format!("<{id}>")))
        .header(ContentType::TEXT_PLAIN)
        .body(outbound.body.to_owned())
        .map_err(|_| Unbuildable {
            code: "invalid-message",
            reason: "The message could not be built.",
        })?;
    Ok((message, id))
}

/// The gateway.
pub struct Smtp {
    /// For log lines.
    host: Host,
    /// The settings.
    config: Config,
    /// The configured sender.
    from: Mailbox,
    /// lettre's transport: connects for each send.
    transport: SmtpTransport,
    /// Set when the server refused the credentials, cleared by the next accepted
    /// send; `health` reports it, since every send fails until they are fixed.
    credentials_refused: AtomicBool,
}

impl fmt::Debug for Smtp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Smtp")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Gateway for Smtp {
    fn start(config: &str, host: Host) -> Result<Self, String> {
        let config = Config::parse(config)?;
        let transport = config.transport()?;
        let from = config
            .from
            .parse()
            .map_err(|_| "from must be an e-mail address.".to_owned())?;
        Ok(Smtp {
            host,
            config,
            from,
            transport,
            credentials_refused: AtomicBool::new(false),
        })
    }

    fn send(&self, message: &Outbound<'_>) -> SendResult {
        let (email, id) = match build_message(&self.config, &self.from, message) {
            Ok(built) => built,
            Err(Unbuildable { code, reason }) => {
                self.host
                    .warn(&format!("Delivery {}: {reason}", message.delivery_id));
                return SendResult::permanent(code, reason);
            }
        };
        match self.transport.send(&email) {
            Ok(response) => {
                self.credentials_refused.store(false, Ordering::Relaxed);
                self.host.info(&format!(
                    "Delivery {} accepted by the SMTP server ({}) as Message-ID {id}.",
                    message.delivery_id,
                    response.code()
                ));
                SendResult::sent(id)
            }
            Err(error) => {
                let result = mapping::map_error(&error);
                let code = match &result {
                    SendResult::Retryable { code, .. } => code.clone().unwrap_or_default(),
                    SendResult::Permanent { code, .. } => code.clone(),
                    _ => String::new(),
                };
                if mapping::AUTH_REFUSED.contains(&code.as_str()) {
                    if !self.credentials_refused.swap(true, Ordering::Relaxed) {
                        self.host.error(&format!(
                            "The SMTP server refused the credentials ({code}): every send will \
                             fail until the configuration is fixed."
                        ));
                    }
                } else {
                    self.host.warn(&format!(
                        "Delivery {}: SMTP send failed ({code}).",
                        message.delivery_id
                    ));
                }
                result
            }
        }
    }

    fn health(&self) -> Health {
        if self.credentials_refused.load(Ordering::Relaxed) {
            Health::Down("The SMTP server refused the credentials on the last send.".to_owned())
        } else {
            Health::Ok
        }
    }
}

export_plugin!(Smtp, "email-smtp", env!("CARGO_PKG_VERSION"), Kind::Email);

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<(), &str>) {
        match (Config::parse(text), expected) {
            (Ok(_), Ok(())) => {}
            (Err(got), Err(fragment)) => assert!(got.contains(fragment), "{text}: {got}"),
            (got, expected) => panic!("{text}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn config_is_checked() {
        check(
            r#"{"host": "smtp.example.org", "from": "care@clinic.example"}"#,
            Ok(()),
        );
        check(
            r#"{"host": "smtp.example.org", "from": "Clinic <care@clinic.example>", "security": "tls",
                "username": "u", "password": "p", "port": 2465}"#,
            Ok(()),
        );
        check(
            r#"{"host": "127.0.0.1", "from": "care@clinic.example", "security": "none", "username": "u", "password": "p"}"#,
            Ok(()),
        );
        check(
            r#"{"host": "smtp.example.org", "from": "care@clinic.example", "security": "none", "username": "u", "password": "p"}"#,
            Err("clear text"),
        );
        check(
            r#"{"host": "smtp.example.org", "from": "care@clinic.example", "username": "u"}"#,
            Err("both"),
        );
        check(
            r#"{"host": "", "from": "care@clinic.example"}"#,
            Err("host"),
        );
        check(r#"{"host": "h", "from": "not an address"}"#, Err("from"));
        check(
            r#"{"host": "h", "from": "a@b.example", "security": "ssl"}"#,
            Err("unknown variant"),
        );
        check(
            r#"{"host": "h", "from": "a@b.example", "port": 0}"#,
            Err("port"),
        );
        check(
            r#"{"host": "h", "from": "a@b.example", "timeout_secs": 0}"#,
            Err("timeout_secs"),
        );
        check(
            r#"{"host": "h", "from": "a@b.example", "default_subject": " "}"#,
            Err("default_subject"),
        );
        check(
            r#"{"host": "h", "from": "a@b.example", "oops": 1}"#,
            Err("oops"),
        );
        check("not json", Err("invalid"));
        let error = Config::parse(
            r#"{"host": "h", "from": "a@b.example", "username": "u", "password": 12345678}"#,
        )
        .expect_err("invalid");
        assert!(!error.contains("12345678"), "{error}");
        let config = Config::parse(
            r#"{"host": "h", "from": "a@b.example", "username": "u", "password": "hunter2"}"#,
        )
        .expect("valid");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn message_ids() {
        for (key, delivery, expected) in [
            ("k-1", "d", "k-1"),
            ("<a b@c>", "d", "abc"),
            ("", "d-9", "d-9"),
            ("@@", "", "caremsg"),
            (".x.", "", "x"),
        ] {
            assert_eq!(message_id_local_part(key, delivery), expected, "{key:?}");
        }
        assert_eq!(message_id_local_part(&"k".repeat(100), "d").len(), 64);
    }

    #[test]
    fn messages() {
        let config = Config::parse(r#"{"host": "h", "from": "Clinic <care@clinic.example>"}"#)
            .expect("valid");
        let from: Mailbox = config.from.parse().expect("from");
        let outbound =
            |to: &'static str, sender: &'static str, subject: Option<&'static str>| Outbound {
                delivery_id: "d-1",
                to,
                from: sender,
                body: "Hello",
                idempotency_key: "key-1",
                subject,
                attempt: 1,
            };
        let text = |o: Outbound<'_>| {
            let (message, id) = build_message(&config, &from, &o).expect("built");
            (String::from_utf8(message.formatted()).expect("UTF-8"), id)
        };
        let (raw, id) = text(outbound(
            "pat@example.org",
            "",
            Some("Line one\r\nBcc: evil@x"),
        ));
        assert_eq!(id, "key-1@clinic.example");
        assert!(
            raw.contains("Message-ID: <key-1@clinic.example>\r\n"),
            "{raw}"
        );
        assert!(raw.contains("Subject: Line one  Bcc: evil@x\r\n"), "{raw}");
        assert!(!raw.contains("\r\nBcc:"), "{raw}");
        assert!(
            raw.contains("From: Clinic <care@clinic.example>\r\n"),
            "{raw}"
        );
        let (raw, _) = text(outbound("pat@example.org", "", None));
        assert!(
            raw.contains("Subject: A message from your care team\r\n"),
            "{raw}"
        );
        let (raw, id) = text(outbound("pat@example.org", "nurse@ward.example", Some("")));
        assert!(raw.contains("From: nurse@ward.example\r\n"), "{raw}");
        assert!(
            raw.contains("Subject: A message from your care team\r\n"),
            "{raw}"
        );
        assert_eq!(id, "key-1@ward.example");
        for (to, sender, code) in [
            ("not an address", "", "invalid-recipient"),
            ("", "", "invalid-recipient"),
            ("pat@example.org", "+15550100", "invalid-sender"),
        ] {
            let error = build_message(&config, &from, &outbound(to, sender, None)).expect_err(to);
            assert_eq!(error.code, code);
        }
    }
}
