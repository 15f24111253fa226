//! Checks of settings that their types cannot express, reported all at once.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{GatewayKind, HaMode, RateLimit, Settings};

/// Longest SMS template, in characters, before `{practice}` is filled in: one GSM-7
/// segment.
pub const SMS_TEMPLATE_MAX_CHARS: usize = 160;

/// Placeholders an SMS template may use.
const SMS_PLACEHOLDERS: &[&str] = &["practice"];

/// The longest `events.coalesce` accepted.
const MAX_COALESCE: Duration = Duration::from_secs(1);

/// Placeholders a notification email template may use.
const EMAIL_PLACEHOLDERS: &[&str] = &["practice", "kind", "link"];

/// One thing wrong with the settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Problem {
    /// Dotted path of the offending field, e.g. `clients[1].token_sha256`.
    pub field: String,
    /// What is wrong with it, as a sentence fragment; never the field's value, which
    /// may be a secret.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Collects problems with the dotted path of the field each is about.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn positive_duration(&mut self, field: &str, value: Duration) {
        if value.is_zero() {
            self.push(field, "must be longer than zero");
        }
    }

    fn at_least_one(&mut self, field: &str, value: u64) {
        if value == 0 {
            self.push(field, "must be at least 1");
        }
    }

    fn http_url(&mut self, field: &str, value: &str) {
        if !is_http_url(value) {
            self.push(
                field,
                "must be an http:// or https:// URL with a host, without spaces",
            );
        }
    }

    fn template(&mut self, field: &str, value: &str, allowed: &[&str], max_chars: Option<usize>) {
        if value.trim().is_empty() {
            self.push(field, "must not be empty");
            return;
        }
        if let Some(max) = max_chars {
            let chars = value.chars().count();
            if chars > max {
                self.push(
                    field,
                    format!("is {chars} characters long, more than the {max} allowed"),
                );
            }
        }
        for name in placeholders(value) {
            if !allowed.contains(&name) {
                let allowed = allowed
                    .iter()
                    .map(|a| format!("{{{a}}}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                self.push(
                    field,
                    format!("uses the unknown placeholder {{{name}}}; allowed: {allowed}"),
                );
            }
        }
    }

    fn rate_limit(&mut self, field: &str, limit: Option<&RateLimit>) {
        let Some(limit) = limit else { return };
        if !(limit.per_second.is_finite() && limit.per_second > 0.0) {
            self.push(
                format!("{field}.per_second"),
                "must be a number greater than zero",
            );
        }
        if limit.burst == 0 {
            self.push(format!("{field}.burst"), "must be at least 1");
        }
    }
}

/// A simple check: `http://` or `https://`, then a non-empty host, no whitespace.
/// Whether a database URL's query options say it goes through a transaction-mode
/// pooler (`pgbouncer=true`, as Prisma writes it, or `pool_mode=transaction`).
fn names_transaction_pooler(url: &str) -> bool {
    let Some((_, query)) = url.split_once('?') else {
        return false;
    };
    query.split('&').any(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, value) = (key.to_ascii_lowercase(), value.to_ascii_lowercase());
        (key == "pgbouncer" && value == "true") || (key == "pool_mode" && value == "transaction")
    })
}

fn is_http_url(value: &str) -> bool {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"));
    let Some(rest) = rest else { return false };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = host.rsplit('@').next().unwrap_or_default();
    !host.is_empty() && !host.starts_with(':') && !value.chars().any(char::is_whitespace)
}

/// The host of an http(s) URL, without port or brackets (`None` when not one).
fn url_host(value: &str) -> Option<&str> {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    Some(match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    })
}

/// Whether `host` names this machine's loopback (`localhost`, 127.0.0.0/8, `::1`).
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a gateway runs the development loopback SMS plugin (by its library's file
/// name, as packaged and built: `libcaremsg_sms_loopback.so`).
fn is_loopback_plugin(gateway: &crate::settings::Gateway) -> bool {
    gateway
        .library
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains("sms_loopback"))
}

/// The names inside `{...}` in a template, in order.
fn placeholders(template: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                names.push(&after[..close]);
                rest = &after[close + 1..];
            }
            None => break,
        }
    }
    names
}

fn is_token_hash(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_instance_name(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn u64_of(value: usize) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

impl Settings {
    /// Settings that are valid but probably a mistake: `check-config` prints them and
    /// the daemon logs them at start. Today: a loopback (development) SMS gateway in a
    /// daemon whose `server.public_url` is not on loopback, i.e. reachable through a
    /// reverse proxy that makes every request look local to the plugin.
    pub fn warnings(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        let public_is_local = url_host(&self.server.public_url).is_some_and(is_loopback_host);
        for (i, gateway) in self.gateways.iter().enumerate() {
            if is_loopback_plugin(gateway) && !public_is_local {
                p.push(
                    format!("gateways[{i}].library"),
                    "the loopback SMS gateway is for development, but server.public_url is not \
                     a loopback address: behind a reverse proxy every request reaches it from \
                     127.0.0.1; remove it, or set its \"secret\"",
                );
            }
        }
        p.0
    }

    /// Checks everything the types do not: uniqueness, formats, ranges and references
    /// between sections. Returns every problem found, not just the first.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut p = Problems::default();

        if self.state_dir.as_os_str().is_empty() {
            p.push("state_dir", "must not be empty");
        }

        // server
        let server = &self.server;
        p.http_url("server.public_url", &server.public_url);
        p.positive_duration("server.request_timeout", server.request_timeout);
        p.at_least_one("server.max_body_bytes", u64_of(server.max_body_bytes));
        p.positive_duration("server.shutdown_timeout", server.shutdown_timeout);
        p.positive_duration("server.sse_keepalive", server.sse_keepalive);
        p.positive_duration("server.header_read_timeout", server.header_read_timeout);
        p.positive_duration("server.idle_timeout", server.idle_timeout);
        p.positive_duration("server.send_timeout", server.send_timeout);
        p.at_least_one("server.max_connections", u64_of(server.max_connections));

        // database
        let database = &self.database;
        if let Some(url) = &database.url {
            let known = ["postgres://", "postgresql://", "sqlite:"];
            if !known.iter().any(|scheme| url.starts_with(scheme)) {
                p.push(
                    "database.url",
                    "must start with postgres://, postgresql:// or sqlite:",
                );
            }
            if names_transaction_pooler(url) {
                p.push(
                    "database.url",
                    "names a transaction-mode pooler (pgbouncer=true or pool_mode=transaction), \
                     which breaks the session locks caremsg holds (migrations, high \
                     availability): connect to PostgreSQL directly or through PgBouncer in \
                     session mode",
                );
            }
        }
        p.at_least_one(
            "database.max_connections",
            u64::from(database.max_connections),
        );
        p.positive_duration("database.busy_timeout", database.busy_timeout);
        p.positive_duration("database.connect_timeout", database.connect_timeout);

        // log
        if self.log.level.trim().is_empty() {
            p.push("log.level", "must not be empty (try \"info\")");
        }

        // clients
        let mut client_names = HashSet::new();
        let mut token_hashes = HashSet::new();
        for (i, client) in self.clients.iter().enumerate() {
            let at = format!("clients[{i}]");
            if client.name.trim().is_empty() {
                p.push(format!("{at}.name"), "must not be empty");
            } else if !client_names.insert(client.name.as_str()) {
                p.push(
                    format!("{at}.name"),
                    format!("another client is already named {:?}", client.name),
                );
            }
            if !is_token_hash(&client.token_sha256) {
                p.push(
                    format!("{at}.token_sha256"),
                    "must be 64 lowercase hex digits (the SHA-256 of the token)",
                );
            } else if !token_hashes.insert(client.token_sha256.as_str()) {
                p.push(
                    format!("{at}.token_sha256"),
                    "is the same as another client's; each client needs its own token",
                );
            }
            if let Some(practices) = &client.practices
                && practices.iter().any(|id| id.trim().is_empty())
            {
                p.push(
                    format!("{at}.practices"),
                    "must not name an empty practice id",
                );
            }
            if client.scopes.is_empty() {
                p.push(
                    format!("{at}.scopes"),
                    "must name at least one of admin, staff, portal",
                );
            }
        }

        // ha
        let ha = &self.ha;
        p.positive_duration("ha.lease_renew", ha.lease_renew);
        if ha.lease_expiry <= ha.lease_renew {
            p.push("ha.lease_expiry", "must be longer than ha.lease_renew");
        }
        if ha.mode == HaMode::ActivePassive && !self.database_url().starts_with("postgres") {
            p.push(
                "ha.mode",
                "\"active-passive\" needs a PostgreSQL database.url (SQLite is single-process)",
            );
        }
        // events
        p.at_least_one("events.max_streams", u64_of(self.events.max_streams));
        p.at_least_one(
            "events.max_streams_per_subscriber",
            u64_of(self.events.max_streams_per_subscriber),
        );
        p.at_least_one("events.buffer", u64_of(self.events.buffer));
        p.positive_duration("events.idle_timeout", self.events.idle_timeout);
        if self.events.coalesce > MAX_COALESCE {
            p.push(
                "events.coalesce",
                "must be at most 1s: staff and portal screens would lag behind visibly",
            );
        }

        // writer
        p.at_least_one(
            "writer.max_batch_units",
            u64_of(self.writer.max_batch_units),
        );
        p.at_least_one("writer.queue_depth", u64_of(self.writer.queue_depth));

        // retention
        let retention = &self.retention;
        p.positive_duration("retention.operational", retention.operational);
        p.positive_duration("retention.unmatched_inbound", retention.unmatched_inbound);
        p.positive_duration("retention.prune_interval", retention.prune_interval);
        p.at_least_one("retention.prune_batch", retention.prune_batch);

        // conversations
        let conversations = &self.conversations;
        p.positive_duration("conversations.idle_timeout", conversations.idle_timeout);
        p.at_least_one("conversations.max_live", u64_of(conversations.max_live));
        p.at_least_one(
            "conversations.sms_body_max_chars",
            u64_of(conversations.sms_body_max_chars),
        );
        p.at_least_one(
            "conversations.portal_body_max_chars",
            u64_of(conversations.portal_body_max_chars),
        );

        // sms_auth
        let sms_auth = &self.sms_auth;
        p.at_least_one("sms_auth.max_attempts", u64::from(sms_auth.max_attempts));
        p.positive_duration("sms_auth.window", sms_auth.window);
        let templates = &sms_auth.templates;
        for (name, text) in [
            ("confirmed", &templates.confirmed),
            ("wrong_reply", &templates.wrong_reply),
            ("failed", &templates.failed),
            ("help", &templates.help),
            ("opted_out", &templates.opted_out),
        ] {
            p.template(
                &format!("sms_auth.templates.{name}"),
                text,
                SMS_PLACEHOLDERS,
                Some(SMS_TEMPLATE_MAX_CHARS),
            );
        }

        // notifications
        let notifications = &self.notifications;
        p.positive_duration(
            "notifications.unread_reminder_after",
            notifications.unread_reminder_after,
        );
        if let Some(name) = &notifications.email_gateway {
            match self.gateways.iter().find(|g| &g.name == name) {
                None => p.push(
                    "notifications.email_gateway",
                    format!("names no [[gateways]] instance: {name:?}"),
                ),
                Some(g) if g.kind != GatewayKind::Email => p.push(
                    "notifications.email_gateway",
                    format!("names the gateway {name:?}, which is not of kind \"email\""),
                ),
                Some(_) => {}
            }
        }
        p.http_url("notifications.link_base_url", &notifications.link_base_url);
        p.template(
            "notifications.email_subject",
            &notifications.email_subject,
            EMAIL_PLACEHOLDERS,
            None,
        );
        p.template(
            "notifications.email_body",
            &notifications.email_body,
            EMAIL_PLACEHOLDERS,
            None,
        );

        // gateways
        let mut gateway_names = HashSet::new();
        for (i, gateway) in self.gateways.iter().enumerate() {
            let at = format!("gateways[{i}]");
            if !is_instance_name(&gateway.name) {
                p.push(
                    format!("{at}.name"),
                    "must be letters, digits, '-' or '_', and not empty",
                );
            } else if !gateway_names.insert(gateway.name.as_str()) {
                p.push(
                    format!("{at}.name"),
                    format!("another gateway is already named {:?}", gateway.name),
                );
            }
            if gateway.library.as_os_str().is_empty() {
                p.push(format!("{at}.library"), "must not be empty");
            }
            if !gateway.config.is_object() {
                p.push(format!("{at}.config"), "must be a table");
            }
            p.at_least_one(&format!("{at}.concurrency"), u64_of(gateway.concurrency));
            for (j, host) in gateway.allowed_hosts.iter().enumerate() {
                let bad =
                    host.is_empty() || host.contains('/') || host.chars().any(char::is_whitespace);
                if bad {
                    p.push(
                        format!("{at}.allowed_hosts[{j}]"),
                        "must be a bare host name such as \"api.example.com\" (no scheme, no path)",
                    );
                }
            }
            if gateway.health_interval < Duration::from_secs(1) {
                p.push(format!("{at}.health_interval"), "must be at least 1s");
            }
            p.rate_limit(&format!("{at}.rate_limit"), gateway.rate_limit.as_ref());
            p.rate_limit(
                &format!("{at}.per_recipient"),
                gateway.per_recipient.as_ref(),
            );
            p.rate_limit(
                &format!("{at}.auto_answers_per_sender"),
                gateway.auto_answers_per_sender.as_ref(),
            );
        }

        if p.0.is_empty() { Ok(()) } else { Err(p.0) }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, reason = "a test fails loudly")]
mod tests {
    use super::*;
    use crate::settings::{ApiClient, Gateway, Scope};
    use std::path::PathBuf;

    /// Settings that pass validation, with a client and two gateways to break.
    fn valid() -> Settings {
        let mut s = Settings::default();
        s.clients.push(ApiClient {
            name: "a".to_owned(),
            token_sha256: crate::hash_token("a"),
            scopes: vec![Scope::Admin],
            practices: None,
        });
        s.clients.push(ApiClient {
            name: "b".to_owned(),
            token_sha256: crate::hash_token("b"),
            scopes: vec![Scope::Staff, Scope::Portal],
            practices: None,
        });
        for (name, kind) in [("sms", GatewayKind::Sms), ("mail", GatewayKind::Email)] {
            s.gateways.push(Gateway {
                name: name.to_owned(),
                kind,
                library: PathBuf::from("lib.so"),
                config: serde_json::json!({}),
                concurrency: 8,
                allowed_hosts: vec!["api.example.com".to_owned()],
                rate_limit: Some(RateLimit {
                    per_second: 1.0,
                    burst: 10,
                }),
                per_recipient: None,
                auto_answers_per_sender: None,
                health_interval: std::time::Duration::from_secs(30),
                down_fails_readiness: false,
            });
        }
        s.notifications.email_gateway = Some("mail".to_owned());
        s
    }

    #[test]
    fn a_loopback_gateway_behind_a_public_url_is_warned_about() {
        let warned = |public_url: &str, library: &str| {
            let mut s = valid();
            s.server.public_url = public_url.to_owned();
            s.gateways[0].library = PathBuf::from(library);
            assert_eq!(s.validate(), Ok(()));
            s.warnings()
                .iter()
                .map(|w| w.field.clone())
                .collect::<Vec<_>>()
        };
        let loopback = "/usr/lib/caremsg/plugins/libcaremsg_sms_loopback.so";
        assert_eq!(
            warned("https://caremsg.clinic.example", loopback),
            ["gateways[0].library"]
        );
        assert_eq!(
            warned("http://10.0.0.5:8680/", loopback),
            ["gateways[0].library"]
        );
        for local in [
            "http://127.0.0.1:8680",
            "http://localhost:8680",
            "http://[::1]:8680",
            "http://127.1.2.3",
        ] {
            assert!(warned(local, loopback).is_empty(), "{local}");
        }
        assert!(warned("https://caremsg.clinic.example", "libcaremsg_sms_twilio.so").is_empty());
        assert!(valid().warnings().is_empty());
    }

    #[test]
    fn coalesce_may_be_zero_or_up_to_a_second() {
        for coalesce in [Duration::ZERO, Duration::from_secs(1)] {
            let mut s = valid();
            s.events.coalesce = coalesce;
            assert!(s.validate().is_ok(), "{coalesce:?}");
        }
    }

    #[test]
    fn health_interval_is_at_least_a_second() {
        check(
            |s| s.gateways[0].health_interval = std::time::Duration::from_millis(10),
            "gateways[0].health_interval",
            "at least 1s",
        );
    }

    /// Breaks `valid()` with `edit` and expects exactly one problem, on `field`, whose
    /// message contains `message`.
    fn check(edit: impl FnOnce(&mut Settings), field: &str, message: &str) {
        let mut s = valid();
        edit(&mut s);
        let problems = s.validate().expect_err(field);
        assert_eq!(problems.len(), 1, "{field}: {problems:?}");
        assert_eq!(problems[0].field, field);
        assert!(
            problems[0].message.contains(message),
            "{field}: {:?} lacks {message:?}",
            problems[0].message
        );
    }

    #[test]
    fn valid_settings_pass() {
        assert_eq!(valid().validate(), Ok(()));
        assert_eq!(Settings::default().validate(), Ok(()));
    }

    #[test]
    #[rustfmt::skip]
    fn each_rule() {
        let zero = Duration::ZERO;
        let hash_a = crate::hash_token("a");
        check(|s| s.state_dir = PathBuf::new(), "state_dir", "empty");
        // Uniqueness.
        check(|s| s.clients[1].name = "a".into(), "clients[1].name", "already named");
        check(|s| s.clients[0].name = " ".into(), "clients[0].name", "empty");
        check(|s| { s.gateways[1].name = "sms".into(); s.notifications.email_gateway = None }, "gateways[1].name", "already named");
        check(|s| s.clients[1].token_sha256 = hash_a, "clients[1].token_sha256", "same as");
        // Token hashes.
        check(|s| s.clients[1].token_sha256 = "ab".repeat(31), "clients[1].token_sha256", "64");
        check(|s| s.clients[1].token_sha256 = "AB".repeat(32), "clients[1].token_sha256", "lowercase");
        check(|s| s.clients[1].token_sha256 = "zz".repeat(32), "clients[1].token_sha256", "hex");
        // Scopes.
        check(|s| s.clients[0].scopes.clear(), "clients[0].scopes", "at least one");
        // Durations.
        check(|s| s.server.request_timeout = zero, "server.request_timeout", "zero");
        check(|s| s.server.shutdown_timeout = zero, "server.shutdown_timeout", "zero");
        check(|s| s.server.sse_keepalive = zero, "server.sse_keepalive", "zero");
        check(|s| s.server.header_read_timeout = zero, "server.header_read_timeout", "zero");
        check(|s| s.server.idle_timeout = zero, "server.idle_timeout", "zero");
        check(|s| s.server.max_connections = 0, "server.max_connections", "at least 1");
        check(|s| s.database.busy_timeout = zero, "database.busy_timeout", "zero");
        check(|s| s.database.connect_timeout = zero, "database.connect_timeout", "zero");
        check(|s| s.conversations.idle_timeout = zero, "conversations.idle_timeout", "zero");
        check(|s| s.sms_auth.window = zero, "sms_auth.window", "zero");
        check(|s| s.notifications.unread_reminder_after = zero, "notifications.unread_reminder_after", "zero");
        check(|s| s.events.coalesce = Duration::from_millis(1_001), "events.coalesce", "at most 1s");
        // Counts.
        check(|s| s.sms_auth.max_attempts = 0, "sms_auth.max_attempts", "at least 1");
        check(|s| s.server.max_body_bytes = 0, "server.max_body_bytes", "at least 1");
        check(|s| s.database.max_connections = 0, "database.max_connections", "at least 1");
        check(|s| s.writer.max_batch_units = 0, "writer.max_batch_units", "at least 1");
        check(|s| s.writer.queue_depth = 0, "writer.queue_depth", "at least 1");
        // High availability: PostgreSQL only, a lease longer than its renewal, no
        // transaction-mode pooler.
        check(|s| s.ha.mode = HaMode::ActivePassive, "ha.mode", "PostgreSQL");
        check(|s| s.ha.lease_expiry = s.ha.lease_renew, "ha.lease_expiry", "longer");
        check(|s| s.ha.lease_renew = zero, "ha.lease_renew", "zero");
        check(|s| s.database.url = Some("postgres://h/db?pgbouncer=true".into()), "database.url", "session mode");
        check(|s| s.database.url = Some("postgres://h/db?sslmode=require&pool_mode=Transaction".into()), "database.url", "transaction-mode pooler");
        check(|s| s.conversations.max_live = 0, "conversations.max_live", "at least 1");
        check(|s| s.conversations.sms_body_max_chars = 0, "conversations.sms_body_max_chars", "at least 1");
        check(|s| s.conversations.portal_body_max_chars = 0, "conversations.portal_body_max_chars", "at least 1");
        check(|s| s.gateways[0].concurrency = 0, "gateways[0].concurrency", "at least 1");
        // Rate limits.
        let limit = |per_second, burst| Some(RateLimit { per_second, burst });
        check(|s| s.gateways[0].rate_limit = limit(0.0, 1), "gateways[0].rate_limit.per_second", "greater than zero");
        check(|s| s.gateways[0].rate_limit = limit(f64::NAN, 1), "gateways[0].rate_limit.per_second", "greater than zero");
        check(|s| s.gateways[0].per_recipient = limit(-1.0, 1), "gateways[0].per_recipient.per_second", "greater than zero");
        check(|s| s.gateways[1].auto_answers_per_sender = limit(1.0, 0), "gateways[1].auto_answers_per_sender.burst", "at least 1");
        // The email gateway reference.
        check(|s| s.notifications.email_gateway = Some("nope".into()), "notifications.email_gateway", "names no");
        check(|s| s.notifications.email_gateway = Some("sms".into()), "notifications.email_gateway", "not of kind");
        // Templates.
        check(|s| s.sms_auth.templates.help = " ".into(), "sms_auth.templates.help", "empty");
        check(|s| s.sms_auth.templates.failed = "x".repeat(161), "sms_auth.templates.failed", "161 characters");
        check(|s| s.sms_auth.templates.confirmed = "Hi {name}".into(), "sms_auth.templates.confirmed", "{name}");
        check(|s| s.notifications.email_subject = String::new(), "notifications.email_subject", "empty");
        check(|s| s.notifications.email_body = "{patient} {link}".into(), "notifications.email_body", "{patient}");
        // URLs.
        check(|s| s.server.public_url = "ftp://x".into(), "server.public_url", "http");
        check(|s| s.server.public_url = "https://".into(), "server.public_url", "host");
        check(|s| s.notifications.link_base_url = "patients/".into(), "notifications.link_base_url", "http");
        check(|s| s.database.url = Some("mysql://x/y".into()), "database.url", "postgres://");
        // Gateways.
        check(|s| s.gateways[0].name = "a b".into(), "gateways[0].name", "letters");
        check(|s| s.gateways[0].library = PathBuf::new(), "gateways[0].library", "empty");
        check(|s| s.gateways[0].config = serde_json::json!([1]), "gateways[0].config", "table");
        check(|s| s.gateways[0].allowed_hosts.push("https://x/".into()), "gateways[0].allowed_hosts[1]", "bare host");
        // The log filter.
        check(|s| s.log.level = String::new(), "log.level", "empty");
    }

    #[test]
    fn sms_template_limit_counts_characters_not_bytes() {
        let mut s = valid();
        s.sms_auth.templates.help = "é".repeat(160);
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn all_problems_are_reported() {
        let mut s = valid();
        s.sms_auth.max_attempts = 0;
        s.clients[0].scopes.clear();
        let problems = s.validate().expect_err("two problems");
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "clients[0].scopes: must name at least one of admin, staff, portal",
                "sms_auth.max_attempts: must be at least 1",
            ]
        );
    }

    #[test]
    fn url_check() {
        for good in [
            "http://a",
            "https://a.example/x/",
            "http://127.0.0.1:3000/p/",
        ] {
            assert!(is_http_url(good), "{good}");
        }
        for bad in [
            "",
            "a.example",
            "http://",
            "http:///x",
            "http://:80",
            "http://a b",
        ] {
            assert!(!is_http_url(bad), "{bad}");
        }
    }
}
