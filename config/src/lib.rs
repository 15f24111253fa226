//! caremsg settings: the typed configuration, its loading, its rules and the reload diff.
//!
//! The daemon calls [`load`] at start and on SIGHUP; on reload it calls [`reload_plan`]
//! with the running and the new settings and applies the listed fields, or keeps the
//! running settings when the plan is refused. The embedded default
//! ([`EMBEDDED_DEFAULT`], `config/caremsg.toml`) runs a development daemon from the
//! repository root; `config/caremsg.production.toml` documents every field.

mod load;
mod reload;
mod settings;
mod validate;

#[cfg(test)]
#[allow(clippy::expect_used, reason = "a test fails loudly")]
mod drift;

use sha2::{Digest, Sha256};

pub use load::{
    ConfigError, EMBEDDED_DEFAULT, ENV_PREFIX, ENV_SEPARATOR, from_toml_str, load, load_with_env,
};
pub use reload::{ReloadRefused, reload_plan};
pub use settings::{
    ApiClient, Conversations, Database, Events, Gateway, GatewayKind, Log, LogFormat,
    Notifications, RateLimit, Retention, Scope, Server, Settings, SmsAuth, SmsTemplates, Writer,
};
pub use validate::{Problem, SMS_TEMPLATE_MAX_CHARS};

/// The lowercase hex SHA-256 of a bearer token, as `clients[].token_sha256` stores it.
/// The same as `printf %s "$TOKEN" | sha256sum` (mind the missing newline).
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
#[allow(clippy::expect_used, reason = "a test fails loudly")]
mod tests {
    use super::*;

    #[test]
    fn hash_token_matches_sha256sum() {
        // Published SHA-256 test vectors.
        assert_eq!(
            hash_token(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
