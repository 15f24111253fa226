//! Scrubbing text a plugin did not write (a provider's error message, an SMTP reply,
//! a configuration parser's complaint) before it becomes a log line or a send
//! result's reason, which the daemon stores and shows.
//!
//! Providers put the recipient in their messages ("The 'To' number +15550100 is not a
//! valid phone number.", "550 5.1.1 <pat@example.org>: Recipient address rejected").
//! [`scrub`] removes what looks like a phone number or an e-mail address; it cannot
//! recognise names, so never pass it a message body.

/// What replaces a redacted value.
pub const REDACTED: &str = "[redacted]";

/// A run of digits and separators with at least this many digits is taken for a phone
/// number. Provider codes (Twilio's five digits, SMTP's `550 5.1.1`) stay readable.
const PHONE_DIGITS: usize = 7;

/// Returns `text` with every word containing `@` (an e-mail address) and every run of
/// digits that looks like a phone number replaced by [`REDACTED`], control characters
/// turned into spaces, and the result cut to `max_chars` characters (an ellipsis marks
/// the cut).
///
/// ```
/// use caremsg_plugin_sdk::redact::scrub;
/// assert_eq!(
///     scrub("The 'To' number +1 555-010-0199 is not valid.", 200),
///     "The 'To' number [redacted] is not valid."
/// );
/// assert_eq!(
///     scrub("550 5.1.1 <pat@example.org>: Recipient address rejected", 200),
///     "550 5.1.1 [redacted] Recipient address rejected"
/// );
/// ```
pub fn scrub(text: &str, max_chars: usize) -> String {
    let words: Vec<String> = text
        .split_whitespace()
        .map(|word| {
            if word.contains('@') {
                REDACTED.to_owned()
            } else {
                word.chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect()
            }
        })
        .collect();
    let joined = redact_numbers(&words.join(" "));
    truncate(&joined, max_chars)
}

/// Hides the values a parser quotes in its messages: every double-quoted span
/// (`"..."`), and the backtick-quoted value after `integer`, `floating point` or
/// `character`, as serde prints them (`invalid type: integer `5550100`, expected a
/// string`). Backtick-quoted names (`unknown field `oops``) stay readable.
///
/// ```
/// use caremsg_plugin_sdk::redact::quoted_values;
/// assert_eq!(
///     quoted_values(r#"invalid type: string "hunter2", expected a boolean at line 1"#),
///     r#"invalid type: string "[redacted]", expected a boolean at line 1"#
/// );
/// assert_eq!(
///     quoted_values("invalid type: integer `5550100`, expected a string"),
///     "invalid type: integer `[redacted]`, expected a string"
/// );
/// ```
pub fn quoted_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(['"', '`']) {
        let (before, from_quote) = rest.split_at(start);
        out.push_str(before);
        let quote = if from_quote.starts_with('"') {
            '"'
        } else {
            '`'
        };
        let after_open = &from_quote[1..];
        let hide = quote == '"'
            || ["integer ", "floating point ", "character "]
                .iter()
                .any(|word| out.ends_with(word));
        let (inside, remainder) = match after_open.find(quote) {
            Some(end) => (&after_open[..end], Some(&after_open[end + 1..])),
            None => (after_open, None),
        };
        out.push(quote);
        out.push_str(if hide { REDACTED } else { inside });
        match remainder {
            Some(remainder) => {
                out.push(quote);
                rest = remainder;
            }
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Replaces runs of `+`, digits and the separators people write inside numbers when
/// the run holds at least [`PHONE_DIGITS`] digits.
fn redact_numbers(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let opens_number = c == '+'
            || c.is_ascii_digit()
            || (c == '(' && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        if opens_number {
            // The run: digits and separators, ending on its last digit.
            let mut end = i;
            let mut last_digit = None;
            let mut digits = 0;
            while end < chars.len()
                && (chars[end].is_ascii_digit()
                    || (end == i && chars[end] == '+')
                    || matches!(chars[end], ' ' | '-' | '.' | '(' | ')' | '/'))
            {
                if chars[end].is_ascii_digit() {
                    digits += 1;
                    last_digit = Some(end);
                }
                end += 1;
            }
            match last_digit {
                Some(last) if digits >= PHONE_DIGITS => {
                    out.push_str(REDACTED);
                    i = last + 1;
                }
                Some(last) => {
                    out.extend(&chars[i..=last]);
                    i = last + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn check(input: &str, expected: &str) {
        assert_eq!(scrub(input, 200), expected, "{input:?}");
    }

    #[test]
    fn scrubs_numbers_and_addresses() {
        check("plain text", "plain text");
        check("+15550100199 is not valid", "[redacted] is not valid");
        check("call (555) 010-0199 now", "call [redacted] now");
        check("+44 20 7946 0958.", "[redacted].");
        check("Error 21211 (code 30007)", "Error 21211 (code 30007)");
        check("451 4.7.1 Try again later", "451 4.7.1 Try again later");
        check(
            "to <a.b+c@example.org>, cc x@y",
            "to [redacted] cc [redacted]",
        );
        check("tab\there\u{7}bell", "tab here bell");
        check(
            "version 1.2.3 and 2026-05-01",
            "version 1.2.3 and [redacted]",
        );
        check("+ alone and 12 and +", "+ alone and 12 and +");
        check("", "");
    }

    #[test]
    fn truncates_on_characters() {
        assert_eq!(scrub("äöüäöü", 4), "äöü…");
        assert_eq!(scrub("abc", 3), "abc");
        assert_eq!(scrub("abcd", 0), "…");
    }

    #[test]
    fn quoted_values_are_hidden() {
        assert_eq!(quoted_values("no quotes"), "no quotes");
        assert_eq!(
            quoted_values(r#"a "x" b "y" c"#),
            r#"a "[redacted]" b "[redacted]" c"#
        );
        assert_eq!(quoted_values(r#"open "secret"#), r#"open "[redacted]"#);
        assert_eq!(
            quoted_values("unknown field `oops`, expected one of `a`, `b`"),
            "unknown field `oops`, expected one of `a`, `b`"
        );
        assert_eq!(
            quoted_values("floating point `1.5`, character `x`, integer `-7`"),
            "floating point `[redacted]`, character `[redacted]`, integer `[redacted]`"
        );
    }
}
