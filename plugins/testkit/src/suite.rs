//! The battery's input: the plugin's configuration and the cases to check, read from
//! the `--config` file.
//!
//! A file whose top level is an object with a `config` key is a suite:
//! ```json
//! {
//!   "config": { "url": "${FAKE_URL}/messages", "outbox": "${TMP}/outbox.jsonl" },
//!   "outbound": { "to": "+15550100", "from": "+15550199", "body": "Hello" },
//!   "send": [
//!     { "name": "accepted", "fake": { "status": 201, "body": "SM${N}" }, "expect": "sent" },
//!     { "name": "rate limited", "fake": { "status": 429, "headers": { "retry-after": "3" } }, "expect": "retryable" }
//!   ],
//!   "webhooks": [
//!     { "name": "reply", "remote_addr": "127.0.0.1:40000", "body": "{...}", "expect_status": 200, "expect_events": 1 }
//!   ]
//! }
//! ```
//! Any other JSON document is the plugin's configuration itself, checked with the
//! default cases (one send expected to succeed, no webhooks). In string values of
//! `config`, `${TMP}` becomes a fresh temporary folder and `${FAKE_URL}` the base URL
//! of the battery's loopback fake HTTP server (which answers with each send case's
//! `fake` response; `${N}` in a fake body becomes the request's sequence number, so
//! provider ids can be unique: the concurrency check requires distinct ids).
//!
//! Webhook cases are built when they run, so a committed suite never goes stale:
//! `${NOW}`, `${NOW-600}`, `${NOW+60}` in their headers and body become Unix seconds
//! of the moment the case runs; `${TS}` becomes the case's `timestamp` (default
//! `${NOW}`); a `sign` block computes a signature header (`hmac-sha256`, `hmac-sha1`,
//! `ed25519`) over a message template such as `${TS}|${BODY}`. Send cases may carry
//! `expect_request`, checked against what the fake received. The complete format,
//! with an example, is in `plugins/testkit/README.md`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Everything the battery needs to know about a plugin.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// The plugin's configuration (placeholders substituted).
    pub config: serde_json::Value,
    /// The message every send uses.
    #[serde(default)]
    pub outbound: SampleOutbound,
    /// Send cases; empty means one case expecting `sent`.
    #[serde(default)]
    pub send: Vec<SendCase>,
    /// Webhook cases.
    #[serde(default)]
    pub webhooks: Vec<WebhookCase>,
    /// How many sends run at once in the concurrency check.
    #[serde(default = "default_concurrent_sends")]
    pub concurrent_sends: usize,
}

fn default_concurrent_sends() -> usize {
    200
}

/// The sample message.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleOutbound {
    /// Recipient.
    pub to: String,
    /// Sender.
    pub from: String,
    /// Text.
    pub body: String,
    /// Subject (e-mail plugins).
    #[serde(default)]
    pub subject: Option<String>,
}

impl Default for SampleOutbound {
    fn default() -> Self {
        SampleOutbound {
            to: "+15550100".to_owned(),
            from: "+15550199".to_owned(),
            body: "Hello from the caremsg testkit.".to_owned(),
            subject: None,
        }
    }
}

/// What a send should map to.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// `SendOutcome::Sent`.
    Sent,
    /// `SendOutcome::Retryable`.
    Retryable,
    /// `SendOutcome::Permanent`.
    Permanent,
    /// `SendOutcome::Unsubscribed`.
    Unsubscribed,
}

/// One send case.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendCase {
    /// Shown in the report.
    pub name: String,
    /// What the fake server answers during this case.
    #[serde(default)]
    pub fake: Option<FakeResponse>,
    /// The expected outcome.
    pub expect: Expect,
    /// The expected provider code (retryable and permanent outcomes).
    #[serde(default)]
    pub code: Option<String>,
    /// What the plugin must have sent to the fake during this case (its last request).
    #[serde(default)]
    pub expect_request: Option<ExpectRequest>,
}

/// The request a send case must produce (every given part is checked; the rest is not).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectRequest {
    /// The method, upper case.
    #[serde(default)]
    pub method: Option<String>,
    /// The path, without the query string.
    #[serde(default)]
    pub path: Option<String>,
    /// Header values (names case-insensitive), compared exactly.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON pointers (RFC 6901) into the JSON body and the value each must have.
    #[serde(default)]
    pub json: BTreeMap<String, serde_json::Value>,
    /// Fields of a form-encoded body and the value each must have.
    #[serde(default)]
    pub form: BTreeMap<String, String>,
}

/// A scripted answer of the fake HTTP server.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Body; `${N}` becomes the request's sequence number.
    #[serde(default)]
    pub body: String,
}

/// One webhook case.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookCase {
    /// Shown in the report.
    pub name: String,
    /// HTTP method.
    #[serde(default = "default_method")]
    pub method: String,
    /// The hook's public URL as the daemon would pass it.
    #[serde(default = "default_public_url")]
    pub public_url: String,
    /// The peer address; `null` for a Unix socket.
    #[serde(default = "default_remote_addr")]
    pub remote_addr: Option<String>,
    /// Request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request body.
    #[serde(default)]
    pub body: String,
    /// What `${TS}` stands for (itself placeholders); default `${NOW}`.
    #[serde(default = "default_timestamp")]
    pub timestamp: String,
    /// Computes a signature header when the case runs.
    #[serde(default)]
    pub sign: Option<Signer>,
    /// The expected status.
    pub expect_status: u16,
    /// How many events the plugin must emit.
    #[serde(default)]
    pub expect_events: usize,
}

fn default_timestamp() -> String {
    "${NOW}".to_owned()
}

/// A signature the battery computes for a webhook case when it runs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signer {
    /// `hmac-sha256`, `hmac-sha1` or `ed25519`.
    pub algorithm: Algorithm,
    /// The key: the HMAC secret, or the Ed25519 private key's 32-byte seed.
    pub key: String,
    /// How `key` is written: `text` (default for HMAC), `base64` (default for
    /// Ed25519) or `hex`.
    #[serde(default)]
    pub key_encoding: Option<Encoding>,
    /// The signed message; `${TS}`, `${BODY}`, `${URL}` (the case's public URL) and
    /// `${NOW...}` are substituted. Default `${BODY}`.
    #[serde(default = "default_message")]
    pub message: String,
    /// The header that carries the signature.
    pub header: String,
    /// How the signature is written: `base64` (default) or `hex`.
    #[serde(default)]
    pub encoding: Option<Encoding>,
    /// Text put before the encoded signature (such as `sha256=`).
    #[serde(default)]
    pub prefix: String,
}

fn default_message() -> String {
    "${BODY}".to_owned()
}

/// A signature algorithm of [`Signer`].
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// HMAC-SHA256.
    HmacSha256,
    /// HMAC-SHA1.
    HmacSha1,
    /// Ed25519.
    Ed25519,
}

/// How bytes are written in a suite.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// As UTF-8 text.
    Text,
    /// Standard base64.
    Base64,
    /// Hex.
    Hex,
}

fn default_method() -> String {
    "POST".to_owned()
}

fn default_public_url() -> String {
    "http://127.0.0.1:8080/v1/hooks/testkit".to_owned()
}

fn default_remote_addr() -> Option<String> {
    Some("127.0.0.1:40000".to_owned())
}

impl Suite {
    /// Reads a suite, or a bare plugin configuration (see the module docs).
    pub fn from_json(text: &str) -> Result<Suite, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("the file is not JSON: {e}"))?;
        if value.get("config").is_some() {
            serde_json::from_value(value).map_err(|e| format!("the suite is invalid: {e}"))
        } else {
            Ok(Suite::for_config(value))
        }
    }

    /// The default battery for a plugin configuration.
    pub fn for_config(config: serde_json::Value) -> Suite {
        Suite {
            config,
            outbound: SampleOutbound::default(),
            send: Vec::new(),
            webhooks: Vec::new(),
            concurrent_sends: default_concurrent_sends(),
        }
    }

    /// The send cases, with the default when none are given.
    pub fn send_cases(&self) -> Vec<SendCase> {
        if self.send.is_empty() {
            vec![SendCase {
                name: "accepted".to_owned(),
                fake: None,
                expect: Expect::Sent,
                code: None,
                expect_request: None,
            }]
        } else {
            self.send.clone()
        }
    }

    /// The configuration with `${TMP}` and `${FAKE_URL}` substituted.
    pub fn config_json(&self, tmp: &str, fake_url: &str) -> String {
        substitute(&self.config, tmp, fake_url).to_string()
    }
}

fn substitute(value: &serde_json::Value, tmp: &str, fake_url: &str) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => {
            Value::String(s.replace("${TMP}", tmp).replace("${FAKE_URL}", fake_url))
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| substitute(v, tmp, fake_url)).collect())
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), substitute(v, tmp, fake_url)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Replaces every `${NOW}`, `${NOW-<seconds>}` and `${NOW+<seconds>}` in `text` with
/// Unix seconds relative to `now`. An unknown form is left as it is.
pub fn substitute_now(text: &str, now: u64) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${NOW") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 5..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let offset = &after[..end];
        let value = match offset.as_bytes().first() {
            None => Some(now),
            Some(b'-') => offset[1..]
                .parse::<u64>()
                .ok()
                .map(|s| now.saturating_sub(s)),
            Some(b'+') => offset[1..]
                .parse::<u64>()
                .ok()
                .map(|s| now.saturating_add(s)),
            Some(_) => None,
        };
        match value {
            Some(value) => out.push_str(&value.to_string()),
            None => out.push_str(&rest[start..start + 5 + end + 1]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn now_placeholders() {
        let check = |text: &str, expected: &str| assert_eq!(substitute_now(text, 1000), expected);
        check("${NOW}", "1000");
        check("t=${NOW-600},v1", "t=400,v1");
        check("${NOW+60}|${NOW}", "1060|1000");
        check("${NOW-2000}", "0");
        check("${NOWX} ${NOW", "${NOWX} ${NOW");
        check("plain", "plain");
    }

    #[test]
    fn bare_config_gets_the_default_battery() {
        let suite = Suite::from_json(r#"{"outbox":"${TMP}/o.jsonl"}"#).expect("suite");
        assert_eq!(suite.send_cases().len(), 1);
        assert_eq!(
            suite.config_json("/t", "http://f"),
            r#"{"outbox":"/t/o.jsonl"}"#
        );
    }

    #[test]
    fn suites_are_strict() {
        assert!(Suite::from_json(r#"{"config":{},"oops":1}"#).is_err());
        let suite = Suite::from_json(r#"{"config":{"u":["${FAKE_URL}/x"]},"send":[{"name":"a","expect":"permanent","code":"400"}]}"#)
            .expect("suite");
        assert_eq!(suite.send_cases()[0].expect, Expect::Permanent);
        assert_eq!(
            suite.config_json("/t", "http://f"),
            r#"{"u":["http://f/x"]}"#
        );
        assert!(Suite::from_json("not json").is_err());
    }
}
