//! SMS keywords: a whole inbound text that opts out, asks for help or opts back in.
//!
//! SPEC ("SMS authentication"): the keywords are matched against the *whole*
//! message, case-insensitively, after trimming, with trailing punctuation ignored
//! (`"Stop."`, `"STOP!"`, `" stop "`). Punctuation before the word is ignored too:
//! the opt-in text itself says "please respond 'STOP'", so `'STOP'` with its quotes
//! must opt out. Nothing else is stripped: `"STOP ALL"`, `"opt out"` and
//! `"please stop texting me"` are not keywords.
//!
//! A text that is not a keyword but uses an opt-out word inside a sentence is stored
//! as a normal message and flagged to staff ([`mentions_opt_out`]); staff decide.

/// What a keyword text asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Keyword {
    /// STOP and its synonyms: opt this number out, in any state.
    OptOut,
    /// HELP or INFO: who is texting and how to opt out.
    Help,
    /// START, UNSTOP or YES: opt back in (a new pending session).
    OptIn,
}

/// The opt-out keywords, as SPEC lists them.
pub const OPT_OUT: &[&str] = &[
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "REVOKE",
    "OPTOUT",
];
/// The help keywords.
pub const HELP: &[&str] = &["HELP", "INFO"];
/// The opt-in keywords.
pub const OPT_IN: &[&str] = &["START", "UNSTOP", "YES"];

/// Words that, inside a longer text, flag it as a possible opt-out request.
///
/// Deliberately narrower than [`OPT_OUT`]: CANCEL, END and QUIT are ordinary words in
/// a clinic's texts ("can I cancel my appointment", "by the end of the week", "I quit
/// smoking"), and a flag raised on most messages would teach staff to ignore it.
/// "Opt out" and "opt-out" (two words, or hyphenated) count.
const FLAG_WORDS: &[&str] = &["STOP", "STOPALL", "UNSUBSCRIBE", "REVOKE", "OPTOUT"];

/// The keyword `text` is, if the whole text is one.
pub fn classify(text: &str) -> Option<Keyword> {
    let word = text.trim_matches(super::is_surrounding);
    let is = |list: &[&str]| list.iter().any(|k| word.eq_ignore_ascii_case(k));
    if is(OPT_OUT) {
        Some(Keyword::OptOut)
    } else if is(HELP) {
        Some(Keyword::Help)
    } else if is(OPT_IN) {
        Some(Keyword::OptIn)
    } else {
        None
    }
}

/// Whether `text` is not an opt-out keyword but still reads like a request to stop
/// texting ("please stop texting me", "opt me out", "unsubscribe me"). The caller
/// stores such a text as a normal message with `possible_opt_out` set.
pub fn mentions_opt_out(text: &str) -> bool {
    if classify(text) == Some(Keyword::OptOut) {
        return false;
    }
    let words: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let flagged = |w: &str| FLAG_WORDS.iter().any(|k| w.eq_ignore_ascii_case(k));
    let opt_out_phrase = words
        .windows(2)
        .any(|pair| pair[0].eq_ignore_ascii_case("opt") && pair[1].eq_ignore_ascii_case("out"));
    // "opt me out", "opt us out".
    let opt_someone_out = words
        .windows(3)
        .any(|three| three[0].eq_ignore_ascii_case("opt") && three[2].eq_ignore_ascii_case("out"));
    words.iter().any(|w| flagged(w)) || opt_out_phrase || opt_someone_out
}

#[cfg(test)]
mod tests {
    use super::Keyword::{Help, OptIn, OptOut};
    use super::*;

    fn check(input: &str, expected: Option<Keyword>) {
        assert_eq!(classify(input), expected, "input: {input:?}");
    }

    fn check_flag(input: &str, expected: bool) {
        assert_eq!(mentions_opt_out(input), expected, "input: {input:?}");
    }

    #[test]
    fn every_listed_keyword_in_every_case() {
        for (list, kind) in [(OPT_OUT, OptOut), (HELP, Help), (OPT_IN, OptIn)] {
            for word in list {
                check(word, Some(kind));
                check(&word.to_lowercase(), Some(kind));
                let mut title = word.to_lowercase();
                title[..1].make_ascii_uppercase();
                check(&title, Some(kind));
            }
        }
    }

    #[test]
    fn opt_out() {
        check("STOP", Some(OptOut));
        check("stop", Some(OptOut));
        check("Stop", Some(OptOut));
        check("sToP", Some(OptOut));
        check(" stop ", Some(OptOut));
        check("Stop.", Some(OptOut));
        check("STOP!", Some(OptOut));
        check("stop!!!", Some(OptOut));
        check("Stop?", Some(OptOut));
        check("STOP\n", Some(OptOut));
        check("\tSTOP \r\n", Some(OptOut));
        check("'STOP'", Some(OptOut));
        check("‘STOP’", Some(OptOut));
        check("\"stop\"", Some(OptOut));
        check("Stop…", Some(OptOut));
        check("\u{00A0}stop\u{200B}", Some(OptOut));
        check("StopAll", Some(OptOut));
        check("Unsubscribe.", Some(OptOut));
        check("cancel", Some(OptOut));
        check("End", Some(OptOut));
        check("QUIT!", Some(OptOut));
        check("revoke", Some(OptOut));
        check("OptOut", Some(OptOut));
    }

    #[test]
    fn help() {
        check("HELP", Some(Help));
        check("help?", Some(Help));
        check(" Info ", Some(Help));
        check("info.", Some(Help));
    }

    #[test]
    fn opt_in() {
        check("START", Some(OptIn));
        check("start.", Some(OptIn));
        check("Unstop", Some(OptIn));
        check("yes", Some(OptIn));
        check("Yes!", Some(OptIn));
    }

    #[test]
    fn not_keywords() {
        check("", None);
        check("   ", None);
        check("!!!", None);
        check("please stop texting me", None);
        check("stop it", None);
        check("STOP STOP", None);
        check("STOP ALL", None);
        check("opt out", None);
        check("opt-out", None);
        check("stopp", None);
        check("stops", None);
        check("S T O P", None);
        check("STOP🛑", None);
        check("yes please", None);
        check("yeah", None);
        check("helpme", None);
        check("01/02/1950", None);
        check("I can't make it, cancel my appointment", None);
        // Non-ASCII look-alikes are not folded.
        check("ЅТОР", None);
    }

    #[test]
    fn sentences_that_mention_opting_out_are_flagged() {
        check_flag("please stop texting me", true);
        check_flag("Stop sending me these", true);
        check_flag("STOP ALL", true);
        check_flag("stop it", true);
        check_flag("How do I unsubscribe?", true);
        check_flag("I want to revoke my consent", true);
        check_flag("opt out", true);
        check_flag("Opt-out please", true);
        check_flag("please opt me out", true);
        check_flag("OPTOUT now", true);
        check_flag("stop.please", true);
    }

    #[test]
    fn keywords_and_ordinary_sentences_are_not_flagged() {
        // The keyword itself is an opt-out, not a possible one.
        check_flag("STOP", false);
        check_flag("Stop.", false);
        check_flag("'stop'", false);
        check_flag("HELP", false);
        check_flag("START", false);
        check_flag("", false);
        check_flag("Thanks, see you Tuesday", false);
        check_flag("I stopped taking the pills", false);
        check_flag("Can I cancel my appointment?", false);
        check_flag("by the end of the week", false);
        check_flag("I quit smoking!", false);
        check_flag("the bus stops here", false);
        check_flag("nonstop coughing", false);
        check_flag("optimal outcome", false);
    }
}
