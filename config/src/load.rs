//! Loading: a TOML file (or the embedded default), then `CAREMSG__...` environment
//! overrides, then validation. Startup and reload both come through here.

use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};

use crate::settings::Settings;
use crate::validate::Problem;

/// The development configuration compiled into the binary, used when no file is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../caremsg.toml");

/// Prefix of environment variables that override settings: `CAREMSG__SERVER__LISTEN`
/// sets `server.listen`, `CAREMSG__STATE_DIR` sets `state_dir`.
pub const ENV_PREFIX: &str = "CAREMSG";

/// Separator between the prefix and the section, and between section and key.
pub const ENV_SEPARATOR: &str = "__";

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment override is not valid TOML, names an unknown field,
    /// or has a value of the wrong type; `message` names the key.
    #[error("cannot parse the configuration: {message}")]
    Parse {
        /// The `config` crate's message, naming the key and the problem.
        message: String,
    },
    /// The settings parsed but broke one or more rules.
    #[error("invalid configuration: {}", join_problems(.0))]
    Invalid(Vec<Problem>),
    /// The configuration file could not be read.
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Io {
        /// The file that was to be read.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
}

fn join_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Loads the settings from `path` (or [`EMBEDDED_DEFAULT`] when `None`), applies
/// `CAREMSG__...` overrides from the process environment and validates the result.
pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
    load_with_env(path, std::env::vars_os().filter_map(unicode_pair))
}

/// Environment variables that are not valid Unicode cannot be ours; skip them instead
/// of failing on some unrelated variable.
fn unicode_pair(
    (key, value): (std::ffi::OsString, std::ffi::OsString),
) -> Option<(String, String)> {
    Some((key.into_string().ok()?, value.into_string().ok()?))
}

/// Like [`load`], with the environment given as (name, value) pairs, so tests need not
/// touch the process environment. Names without the `CAREMSG__` prefix are ignored.
pub fn load_with_env(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    let text = match path {
        Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?,
        None => EMBEDDED_DEFAULT.to_owned(),
    };
    parse(&text, env)
}

/// Parses and validates settings from TOML text, without environment overrides.
pub fn from_toml_str(text: &str) -> Result<Settings, ConfigError> {
    parse(text, std::iter::empty())
}

fn parse(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    // Only our own variables go to the `config` crate; it lower-cases names itself.
    let ours: config::Map<String, String> = env
        .into_iter()
        .filter(|(key, _)| {
            key.get(..ENV_PREFIX.len() + ENV_SEPARATOR.len())
                .is_some_and(|head| head.eq_ignore_ascii_case("CAREMSG__"))
        })
        .collect();
    // No `try_parsing`: the `config` crate converts a string to the number, bool or
    // duration the field wants when deserializing, while `try_parsing` would turn a
    // string-typed value such as "0123" or "1e3" into a number and back, changing it.
    let environment = Environment::with_prefix(ENV_PREFIX)
        .separator(ENV_SEPARATOR)
        .source(Some(ours));
    let settings: Settings = Config::builder()
        .add_source(File::from_str(text, FileFormat::Toml))
        .add_source(environment)
        .build()
        .and_then(Config::try_deserialize)
        .map_err(|e| ConfigError::Parse {
            message: e.to_string(),
        })?;
    settings.validate().map_err(ConfigError::Invalid)?;
    Ok(settings)
}

#[cfg(test)]
#[allow(clippy::expect_used, reason = "a test fails loudly")]
mod tests {
    use super::*;
    use crate::settings::{GatewayKind, LogFormat};
    use std::time::Duration;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn parse_error(text: &str) -> String {
        match from_toml_str(text) {
            Err(ConfigError::Parse { message }) => message,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn embedded_default_loads() {
        let s = load_with_env(None, Vec::new()).expect("embedded default");
        assert_eq!(s.database_url(), "sqlite://state/caremsg.db?mode=rwc");
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:8680");
        assert_eq!(s.gateways[0].name, "loopback");
        assert_eq!(s.gateways[0].kind, GatewayKind::Sms);
    }

    #[test]
    fn empty_file_gives_code_defaults() {
        assert_eq!(from_toml_str("").expect("empty"), Settings::default());
    }

    #[test]
    fn env_overrides_nested_keys_numbers_and_durations() {
        let s = load_with_env(
            None,
            env(&[
                ("CAREMSG__DATABASE__URL", "postgres://caremsg@db/caremsg"),
                ("CAREMSG__SERVER__LISTEN", "0.0.0.0:9000"),
                ("CAREMSG__STATE_DIR", "/var/lib/caremsg"),
                ("CAREMSG__SERVER__MAX_BODY_BYTES", "2048"),
                ("CAREMSG__SMS_AUTH__MAX_ATTEMPTS", "5"),
                ("CAREMSG__SMS_AUTH__WINDOW", "7days"),
                (
                    "CAREMSG__SMS_AUTH__TEMPLATES__HELP",
                    "{practice}: help 0123",
                ),
                ("CAREMSG__LOG__FORMAT", "json"),
                ("caremsg__log__level", "debug"),
                // Not ours: ignored, although `config` would read it as key "config".
                ("CAREMSG_CONFIG", "/etc/caremsg.toml"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .expect("overrides apply");
        assert_eq!(s.database_url(), "postgres://caremsg@db/caremsg");
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/caremsg"));
        assert_eq!(s.server.max_body_bytes, 2048);
        assert_eq!(s.sms_auth.max_attempts, 5);
        assert_eq!(s.sms_auth.window, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(s.sms_auth.templates.help, "{practice}: help 0123");
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.log.level, "debug");
        // The rest of the file is kept.
        assert_eq!(s.clients.len(), 3);
    }

    #[test]
    fn env_overrides_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[writer]\nqueue_depth = 10\nmax_batch_units = 3\n").expect("write");
        let s = load_with_env(Some(&path), env(&[("CAREMSG__WRITER__QUEUE_DEPTH", "20")]))
            .expect("loads");
        assert_eq!(s.writer.queue_depth, 20);
        assert_eq!(s.writer.max_batch_units, 3);
    }

    #[test]
    fn bad_env_values_are_refused() {
        let err = load_with_env(None, env(&[("CAREMSG__SERVER__MAX_BODY_BYTES", "lots")]))
            .expect_err("not a number");
        assert!(err.to_string().contains("server.max_body_bytes"), "{err}");
        let err = load_with_env(None, env(&[("CAREMSG__SERVER__NO_SUCH", "1")]))
            .expect_err("unknown key");
        assert!(err.to_string().contains("no_such"), "{err}");
        let err = load_with_env(None, env(&[("CAREMSG__SMS_AUTH__MAX_ATTEMPTS", "0")]))
            .expect_err("invalid value");
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let message = parse_error("[server]\nlisten_address = \"127.0.0.1:1\"\n");
        assert!(message.contains("listen_address"), "{message}");
        let message = parse_error("sate_dir = \"x\"\n");
        assert!(message.contains("sate_dir"), "{message}");
        let message = parse_error(
            "[[gateways]]\nname = \"a\"\nkind = \"sms\"\nlibrary = \"a.so\"\nrate_limit = { per_second = 1.0, burst = 1, brust = 2 }\n",
        );
        assert!(message.contains("brust"), "{message}");
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let message = parse_error("[server]\nlisten = \"localhost\"\n");
        assert!(message.contains("server.listen"), "{message}");
        let message = parse_error("[sms_auth]\nwindow = \"two weeks\"\n");
        assert!(message.contains("sms_auth.window"), "{message}");
        let message = parse_error("[log]\nformat = \"xml\"\n");
        assert!(message.contains("xml"), "{message}");
        let message =
            parse_error("[[clients]]\nname = \"a\"\ntoken_sha256 = \"00\"\nscopes = [\"root\"]\n");
        assert!(message.contains("root"), "{message}");
        let message = parse_error("[server\n");
        assert!(!message.is_empty());
    }

    #[test]
    fn invalid_settings_are_refused_with_problems() {
        match from_toml_str("[sms_auth]\nmax_attempts = 0\n") {
            Err(ConfigError::Invalid(problems)) => {
                assert_eq!(problems[0].field, "sms_auth.max_attempts");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.toml");
        let err = load_with_env(Some(&path), Vec::new()).expect_err("absent");
        assert!(matches!(err, ConfigError::Io { .. }), "{err}");
        assert!(err.to_string().contains("absent.toml"), "{err}");
    }
}
