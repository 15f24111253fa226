//! The services the daemon gives plugins ([`HostServices`]): `emit` into a bounded
//! channel read by the inbound task, `log` into tracing under the instance's name,
//! and `http` through [`HyperHttp`] with the instance's allow-list.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use caremsg_config::Settings;
use caremsg_plugin_host::{
    EmitOutcome, Event, HostServices, HttpRequest, HttpResponse, HyperHttp, Level,
};
use tokio::sync::mpsc;

use crate::clock::SharedClock;

/// Longest plugin log message kept; the rest is cut off.
const MAX_LOG_CHARS: usize = 1_000;

/// An event a plugin emitted outside a webhook call.
#[derive(Debug)]
pub struct Emitted {
    /// The instance that emitted it.
    pub instance: String,
    /// What it reported.
    pub event: Event,
}

/// The [`HostServices`] of every instance (the instance name comes with each call).
pub(crate) struct Services {
    /// The plugins' HTTP client, with a per-instance allow-list.
    pub(crate) http: Arc<HyperHttp>,
    /// Where emitted events go; bounded, so a flood answers `Busy` instead of growing.
    pub(crate) emitted: mpsc::Sender<Emitted>,
    /// The live settings: `hook_url` reads `server.public_url` (reloadable) from them.
    pub(crate) settings: Arc<ArcSwap<Settings>>,
    /// The daemon's clock, which plugins read through `now`.
    pub(crate) clock: SharedClock,
}

/// The public URL of instance `name`'s webhook: what providers are told to call, and
/// what they sign.
pub(crate) fn hook_url(public_url: &str, name: &str) -> String {
    format!("{}/v1/hooks/{name}", public_url.trim_end_matches('/'))
}

impl HostServices for Services {
    fn emit(&self, instance: &str, event: Event) -> EmitOutcome {
        match self.emitted.try_send(Emitted {
            instance: instance.to_owned(),
            event,
        }) {
            Ok(()) => EmitOutcome::Accepted,
            Err(_) => EmitOutcome::Busy,
        }
    }

    fn log(&self, instance: &str, level: Level, message: &str) {
        let message = scrub(message);
        match level {
            Level::Error => tracing::error!(gateway = instance, "{message}"),
            Level::Warn => tracing::warn!(gateway = instance, "{message}"),
            Level::Info => tracing::info!(gateway = instance, "{message}"),
            Level::Debug => tracing::debug!(gateway = instance, "{message}"),
            Level::Trace => tracing::trace!(gateway = instance, "{message}"),
        }
    }

    fn http(&self, instance: &str, request: HttpRequest) -> Result<HttpResponse, String> {
        self.http
            .request(instance, request)
            .map_err(|error| error.to_string())
    }

    fn hook_url(&self, instance: &str) -> Option<String> {
        Some(hook_url(&self.settings.load().server.public_url, instance))
    }

    fn now(&self) -> SystemTime {
        self.clock.now().into()
    }
}

/// A plugin's log message as the daemon writes it: at most [`MAX_LOG_CHARS`]
/// characters, control characters replaced, and anything that looks like a phone
/// number (a `+` or a word boundary, then 7 or more digits) redacted, unless the digits
/// are a group of an id that holds letters (letters, digits, `-` and `_` joined, such
/// as a UUID or `lb-…`): those stay whole (plugins/README.md documents this). Plugins
/// must not log PHI; this is a second line of defence, not a licence.
pub(crate) fn scrub(message: &str) -> String {
    let chars: Vec<char> = message.chars().take(MAX_LOG_CHARS).collect();
    let mut out = String::with_capacity(chars.len());
    let mut i = 0;
    // Whether the token around `at` (letters, digits, '-' and '_') holds a letter: an
    // id such as a UUID or `lb-…`, whose digit groups are not phone numbers.
    let in_id = |at: usize| {
        let part = |c: &char| c.is_alphanumeric() || matches!(c, '-' | '_');
        let start = chars[..at]
            .iter()
            .rposition(|c| !part(c))
            .map_or(0, |p| p + 1);
        let end = chars[at..]
            .iter()
            .position(|c| !part(c))
            .map_or(chars.len(), |p| at + p);
        chars[start..end].iter().any(|c| c.is_alphabetic())
    };
    while i < chars.len() {
        let c = chars[i];
        let starts_word = i == 0 || !chars[i - 1].is_alphanumeric();
        let digits_from = if c == '+' { i + 1 } else { i };
        if starts_word && chars.get(digits_from).is_some_and(char::is_ascii_digit) {
            let end = chars[digits_from..]
                .iter()
                .position(|c| !c.is_ascii_digit())
                .map_or(chars.len(), |n| digits_from + n);
            let ends_word = chars.get(end).is_none_or(|c| !c.is_alphanumeric());
            if end - digits_from >= 7 && ends_word && !in_id(digits_from) {
                out.push_str("[redacted]");
                i = end;
                continue;
            }
        }
        out.push(if c.is_control() { ' ' } else { c });
        i += 1;
    }
    if message.chars().nth(MAX_LOG_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: &str) {
        assert_eq!(scrub(input), expected, "{input}");
    }

    #[test]
    fn scrubs_numbers_but_not_ids() {
        check("sent to +15550100123.", "sent to [redacted].");
        check("sent to 2015550123 ok", "sent to [redacted] ok");
        check("id lb-4f3a1234567b ok", "id lb-4f3a1234567b ok");
        check("delivery 0192c3e4-1234567-x", "delivery 0192c3e4-1234567-x");
        check(
            "id 0192c3e4-5b6a-7c8d-9e0f-123456789012.",
            "id 0192c3e4-5b6a-7c8d-9e0f-123456789012.",
        );
        check("to +1-2015550123 now", "to +1-[redacted] now");
        check(
            "to -2015550123 and 2015550123-",
            "to -[redacted] and [redacted]-",
        );
        check("3 segment(s), 160 chars", "3 segment(s), 160 chars");
        check("line\nbreak", "line break");
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "a".repeat(MAX_LOG_CHARS + 10);
        let scrubbed = scrub(&long);
        assert_eq!(scrubbed.chars().count(), MAX_LOG_CHARS + 1);
    }
}
