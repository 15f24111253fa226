//! Phone numbers: parsed with `phonenumber` (a port of libphonenumber) against the
//! practice's country, stored as E.164.

use std::str::FromStr;

use phonenumber::country::Id;
use phonenumber::{Mode, PhoneNumber, Type};

use crate::phi::{Phi, Phone};

/// Why a number was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    /// Not a phone number, or not a valid one.
    #[error("not a valid phone number")]
    Invalid,
    /// A valid number that cannot receive texts (a landline, a pager, a toll-free line).
    #[error("not a mobile phone number")]
    NotMobile,
}

/// The country for `code` (ISO 3166-1 alpha-2), if libphonenumber knows it.
pub fn country(code: &str) -> Option<Id> {
    Id::from_str(&code.to_ascii_uppercase()).ok()
}

fn parse(input: &str, region: Id) -> Result<PhoneNumber, PhoneError> {
    let number = phonenumber::parse(Some(region), input.trim()).map_err(|_| PhoneError::Invalid)?;
    if number.is_valid() {
        Ok(number)
    } else {
        Err(PhoneError::Invalid)
    }
}

fn e164(number: &PhoneNumber) -> Phone {
    Phi::new(number.format().mode(Mode::E164).to_string())
}

/// Any valid number, national or international format, as E.164.
pub fn parse_any(input: &str, region: Id) -> Result<Phone, PhoneError> {
    parse(input, region).map(|n| e164(&n))
}

/// A number that can receive texts, as E.164. Where the numbering plan cannot tell
/// mobile from fixed lines (as in the US), the number is accepted.
pub fn parse_mobile(input: &str, region: Id) -> Result<Phone, PhoneError> {
    let number = parse(input, region)?;
    match number.number_type(&phonenumber::metadata::DATABASE) {
        Type::Mobile | Type::FixedLineOrMobile => Ok(e164(&number)),
        _ => Err(PhoneError::NotMobile),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, region: &str, expected: Result<&str, PhoneError>) {
        let got = parse_mobile(input, country(region).unwrap());
        assert_eq!(
            got.as_ref().map(|p| p.expose().as_str()),
            expected.as_ref().map(|s| *s),
            "{input}"
        );
    }

    #[test]
    fn mobile_numbers() {
        check("(201) 555-0123", "US", Ok("+12015550123"));
        check("201.555.0123", "us", Ok("+12015550123"));
        check("+1 201 555 0123", "US", Ok("+12015550123"));
        check("+44 7400 123456", "US", Ok("+447400123456"));
        check("07400 123456", "GB", Ok("+447400123456"));
        check("020 7946 0000", "GB", Err(PhoneError::NotMobile));
        check("1-800-555-0199", "US", Err(PhoneError::NotMobile));
        check("12345", "US", Err(PhoneError::Invalid));
        check("not a number", "US", Err(PhoneError::Invalid));
        check("", "US", Err(PhoneError::Invalid));
    }

    #[test]
    fn countries() {
        assert!(country("US").is_some());
        assert!(country("gb").is_some());
        assert!(country("XX").is_none());
    }
}
