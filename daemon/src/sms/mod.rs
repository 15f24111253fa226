//! SMS authentication and consent: the pure parts the SMS authentication actor uses.
//!
//! - [`dob`] reads a date-of-birth reply (MM/DD/YYYY, lenient only where no doubt is
//!   possible) and compares it with the patient's date of birth.
//! - [`keywords`] classifies a whole inbound text as an opt-out, help or opt-in
//!   keyword, and spots a sentence that merely mentions opting out.
//! - [`reply`] puts the two together in SPEC's order for a pending session.
//! - [`texts`] words the outbound texts: the fixed opt-in text and the configurable
//!   templates, filled with the practice's name and nothing else, and counts their
//!   GSM-7/UCS-2 segments.
//!
//! None of these functions logs, and none returns an error that could carry the text
//! it was given: an inbound body and a date of birth are PHI.

pub mod auth;
pub mod dob;
pub mod keywords;
pub mod reply;
pub mod texts;

/// Characters that may surround a keyword or a date in a reply, and are ignored there:
/// white space, ASCII punctuation, the quotes and dots phones substitute for ASCII
/// ones, and invisible format characters some keyboards insert.
fn is_surrounding(c: char) -> bool {
    c.is_whitespace()
        || c.is_ascii_punctuation()
        || matches!(
            c,
            '‘' | '’'
                | '“'
                | '”'
                | '«'
                | '»'
                | '…'
                | '¡'
                | '¿'
                | '\u{200B}'
                | '\u{200C}'
                | '\u{200D}'
                | '\u{2060}'
                | '\u{FEFF}'
        )
}
