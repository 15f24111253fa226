//! Reading a date-of-birth reply: MM/DD/YYYY, lenient only where no doubt is possible.
//!
//! SPEC ("SMS authentication", step 3) accepts MM/DD/YYYY and allows, because none of
//! them can change which date is meant:
//! - spaces and punctuation *around* the date (`" 01/02/1950. "`, `"(01/02/1950)"`,
//!   `"“01/02/1950”"` from a phone that curls quotes);
//! - a one-digit month or day (`1/2/1950`);
//! - `-` or `.` instead of `/`, used consistently (`1-2-1950`, `01.02.1950`).
//!
//! Everything else is refused, because a guess could accept the wrong date or teach
//! patients a form staff don't expect: two-digit years (`1/2/50`: 1950 or 2050?),
//! dates that don't exist (`02/30/1950`, `13/01/1990`), dates in words
//! (`January 2, 1950`), other orders (`1950-01-02`), mixed separators
//! (`01/02-1950`), spaces inside the date (`01 / 02 / 1950`) and extra words
//! (`my dob is 01/02/1950`). The order is always month first (US): `02/01/1950` is
//! February 1st even though it could be read as January 2nd elsewhere, since the
//! opt-in text asks for MM/DD/YYYY.
//!
//! A refused reply is simply not a date; the caller counts it as a wrong attempt like
//! any other wrong reply. Nothing here logs or echoes the text: it is PHI.

use chrono::NaiveDate;

/// The date `text` spells in the accepted forms, or `None`.
pub fn parse_reply(text: &str) -> Option<NaiveDate> {
    let date = text.trim_matches(super::is_surrounding);
    let separator = date.chars().find(|c| !c.is_ascii_digit())?;
    if !matches!(separator, '/' | '-' | '.') {
        return None;
    }
    // Splitting on the first separator found leaves any other separator inside a
    // field, where the digit check refuses it: separators must be consistent.
    let mut fields = date.split(separator);
    let (Some(month), Some(day), Some(year), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return None;
    };
    let month = number(month, 1..=2)?;
    let day = number(day, 1..=2)?;
    let year = number(year, 4..=4)?;
    NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)
}

/// Whether `text` is a date-of-birth reply naming exactly `date_of_birth`.
pub fn matches(text: &str, date_of_birth: NaiveDate) -> bool {
    parse_reply(text) == Some(date_of_birth)
}

/// A field of ASCII digits whose length is in `digits`.
fn number(field: &str, digits: std::ops::RangeInclusive<usize>) -> Option<u32> {
    if !digits.contains(&field.len()) || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    /// `expected` is `(year, month, day)`, or `None` for a refused reply.
    fn check(input: &str, expected: Option<(i32, u32, u32)>) {
        let expected = expected.map(|(y, m, d)| NaiveDate::from_ymd_opt(y, m, d).unwrap());
        assert_eq!(parse_reply(input), expected, "input: {input:?}");
    }

    #[test]
    fn the_canonical_form() {
        check("01/02/1950", Some((1950, 1, 2)));
        check("12/31/1999", Some((1999, 12, 31)));
        check("07/04/2001", Some((2001, 7, 4)));
        check("10/10/1910", Some((1910, 10, 10)));
    }

    #[test]
    fn one_digit_month_or_day() {
        check("1/2/1950", Some((1950, 1, 2)));
        check("1/02/1950", Some((1950, 1, 2)));
        check("01/2/1950", Some((1950, 1, 2)));
        check("9/30/1975", Some((1975, 9, 30)));
    }

    #[test]
    fn dash_or_dot_used_consistently() {
        check("01-02-1950", Some((1950, 1, 2)));
        check("1-2-1950", Some((1950, 1, 2)));
        check("01.02.1950", Some((1950, 1, 2)));
        check("1.2.1950", Some((1950, 1, 2)));
    }

    #[test]
    fn mixed_separators_are_refused() {
        check("01/02-1950", None);
        check("01-02/1950", None);
        check("01.02/1950", None);
        check("01/02.1950", None);
    }

    #[test]
    fn surrounding_spaces_and_punctuation() {
        check(" 01/02/1950", Some((1950, 1, 2)));
        check("01/02/1950 ", Some((1950, 1, 2)));
        check("\t01/02/1950\r\n", Some((1950, 1, 2)));
        check("01/02/1950.", Some((1950, 1, 2)));
        check("01.02.1950.", Some((1950, 1, 2)));
        check("01/02/1950!!", Some((1950, 1, 2)));
        check("(01/02/1950)", Some((1950, 1, 2)));
        check("'01/02/1950'", Some((1950, 1, 2)));
        check("\"01/02/1950\"", Some((1950, 1, 2)));
        check("“01/02/1950”", Some((1950, 1, 2)));
        check("\u{00A0}01/02/1950\u{200B}", Some((1950, 1, 2)));
        check(" - 1-2-1950 - ", Some((1950, 1, 2)));
    }

    #[test]
    fn month_comes_first_us_order() {
        // Could be 1 February elsewhere; the opt-in text asks for MM/DD/YYYY.
        check("02/01/1950", Some((1950, 2, 1)));
        check("12/11/1980", Some((1980, 12, 11)));
        // Unambiguous as DD/MM, but not MM/DD: refused, never reinterpreted.
        check("13/01/1990", None);
        check("31/12/1999", None);
    }

    #[test]
    fn impossible_dates_are_refused() {
        check("02/30/1950", None);
        check("02/29/1950", None);
        check("02/29/1900", None);
        check("04/31/1960", None);
        check("00/10/1960", None);
        check("10/00/1960", None);
        check("10/32/1960", None);
        check("0/1/1960", None);
    }

    #[test]
    fn leap_days_that_exist() {
        check("02/29/1952", Some((1952, 2, 29)));
        check("2/29/2000", Some((2000, 2, 29)));
    }

    #[test]
    fn two_digit_and_other_year_lengths_are_refused() {
        check("01/02/50", None);
        check("1/2/50", None);
        check("01/02/195", None);
        check("01/02/01950", None);
        check("01-02-50", None);
    }

    #[test]
    fn padded_fields_are_refused() {
        check("001/02/1950", None);
        check("01/002/1950", None);
    }

    #[test]
    fn dates_in_words_are_refused() {
        check("January 2, 1950", None);
        check("Jan 2 1950", None);
        check("2 January 1950", None);
        check("01/Jan/1950", None);
        check("first of february nineteen fifty", None);
    }

    #[test]
    fn extra_text_is_refused() {
        check("my dob is 01/02/1950", None);
        check("01/02/1950 thanks", None);
        check("DOB: 01/02/1950", None);
        check("01/02/1950 01/02/1950", None);
        check("01/02/1950\n01/02/1950", None);
    }

    #[test]
    fn other_shapes_are_refused() {
        check("", None);
        check("   ", None);
        check("...", None);
        check("01021950", None);
        check("1950-01-02", None);
        check("1950/01/02", None);
        check("01 02 1950", None);
        check("01 / 02 / 1950", None);
        check("01/ 02/1950", None);
        check("01//02/1950", None);
        check("01/02", None);
        check("01/02/1950/", Some((1950, 1, 2)));
        check("01/02/1950/12", None);
        check("01_02_1950", None);
        check("+1/02/1950", Some((1950, 1, 2)));
        check("-1/02/1950", Some((1950, 1, 2)));
        check("STOP", None);
    }

    #[test]
    fn only_ascii_digits() {
        // Arabic-Indic and full-width digits.
        check("٠١/٠٢/١٩٥٠", None);
        check("０１/０２/１９５０", None);
    }

    #[test]
    fn matches_compares_with_the_date_of_birth() {
        let dob = NaiveDate::from_ymd_opt(1950, 1, 2).unwrap();
        assert!(matches("1/2/1950", dob));
        assert!(matches(" 01.02.1950. ", dob));
        assert!(!matches("02/01/1950", dob));
        assert!(!matches("01/02/1951", dob));
        assert!(!matches("01/02/50", dob));
        assert!(!matches("my dob is 01/02/1950", dob));
    }
}
