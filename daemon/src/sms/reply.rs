//! What a patient's reply to a pending SMS authentication means, in SPEC's order.
//!
//! SPEC ("Replies while pending") checks, in this order: an opt-out keyword, a help
//! keyword, the date of birth, and anything else is a failed attempt. The opt-in
//! keywords (START, UNSTOP, YES) are not in that list, so while a session is pending
//! they are "anything else": a failed attempt. Treating them as "open a new session"
//! instead would reset the attempt counter, and a patient — or whoever holds the
//! phone — could then guess a date of birth without limit.

use chrono::NaiveDate;

use super::dob;
use super::keywords::{self, Keyword};

/// The meaning of a reply while the session is pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PendingReply {
    /// An opt-out keyword: `opted_out`, one confirmation text.
    OptOut,
    /// A help keyword: the help text; not an attempt.
    Help,
    /// The patient's date of birth: `enabled`, a confirmation text.
    Confirmed,
    /// Anything else: a failed attempt.
    WrongAttempt,
}

/// What `text` means to a session pending for a patient born on `date_of_birth`.
pub fn pending_reply(text: &str, date_of_birth: NaiveDate) -> PendingReply {
    match keywords::classify(text) {
        Some(Keyword::OptOut) => PendingReply::OptOut,
        Some(Keyword::Help) => PendingReply::Help,
        Some(Keyword::OptIn) => PendingReply::WrongAttempt,
        None if dob::matches(text, date_of_birth) => PendingReply::Confirmed,
        None => PendingReply::WrongAttempt,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::PendingReply::{Confirmed, Help, OptOut, WrongAttempt};
    use super::*;

    fn check(input: &str, expected: PendingReply) {
        let dob = NaiveDate::from_ymd_opt(1950, 1, 2).unwrap();
        assert_eq!(pending_reply(input, dob), expected, "input: {input:?}");
    }

    #[test]
    fn spec_order() {
        check("STOP", OptOut);
        check("stop.", OptOut);
        check("Cancel", OptOut);
        check("HELP", Help);
        check("info?", Help);
        check("01/02/1950", Confirmed);
        check(" 1-2-1950. ", Confirmed);
        check("02/01/1950", WrongAttempt);
        check("01/02/50", WrongAttempt);
        check("my dob is 01/02/1950", WrongAttempt);
        check("", WrongAttempt);
        check("please stop texting me", WrongAttempt);
        check("Who is this?", WrongAttempt);
    }

    #[test]
    fn opting_in_while_pending_is_a_wrong_attempt() {
        check("START", WrongAttempt);
        check("yes", WrongAttempt);
        check("UNSTOP", WrongAttempt);
    }
}
