//! Timestamps in answers and event streams, written byte for byte as chrono's serde
//! writes a `DateTime<Utc>` (RFC 3339 in UTC with `Z`; a fraction of a second of 3, 6
//! or 9 digits, the fewest that hold it exactly, or none), but straight into a stack
//! buffer. chrono's serializer goes through `core::fmt` and serde_json's
//! `collect_str`, which escapes every piece `fmt` hands it: about 2,800 instructions
//! a timestamp, more than half of what rendering a notification for a staff stream
//! cost (`bench events`; callgrind). Use with
//! `#[serde(serialize_with = "timestamp::serialize")]` (or `timestamp::option::serialize`).
//!
//! A year outside 0–9999 is left to chrono's serializer (it writes a sign): none is
//! stored, but the output stays chrono's either way.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Serialize, Serializer};

/// The longest form: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const MAX_LEN: usize = 30;

/// Writes `at` into `buf` as chrono's serde does; the length written, or `None` for a
/// year this does not write (outside 0–9999).
fn write(at: &DateTime<Utc>, buf: &mut [u8; MAX_LEN]) -> Option<usize> {
    // Once: each of `DateTime`'s own accessors works it out again.
    let at = at.naive_utc();
    let year = u32::try_from(at.year()).ok().filter(|year| *year <= 9999)?;
    // A leap second is the 60th second of its minute.
    let (second, nano) = match at.nanosecond().checked_sub(1_000_000_000) {
        Some(nano) => (at.second() + 1, nano),
        None => (at.second(), at.nanosecond()),
    };
    let mut len = 0;
    digits(buf, &mut len, year, 4);
    for (separator, value) in [
        (b'-', at.month()),
        (b'-', at.day()),
        (b'T', at.hour()),
        (b':', at.minute()),
        (b':', second),
    ] {
        buf[len] = separator;
        len += 1;
        digits(buf, &mut len, value, 2);
    }
    let fraction = if nano == 0 {
        None
    } else if nano % 1_000_000 == 0 {
        Some((nano / 1_000_000, 3))
    } else if nano % 1_000 == 0 {
        Some((nano / 1_000, 6))
    } else {
        Some((nano, 9))
    };
    if let Some((value, count)) = fraction {
        buf[len] = b'.';
        len += 1;
        digits(buf, &mut len, value, count);
    }
    buf[len] = b'Z';
    Some(len + 1)
}

/// Writes the last `count` decimal digits of `value` at `*len`, zero-padded, and moves
/// `*len` past them.
fn digits(buf: &mut [u8; MAX_LEN], len: &mut usize, value: u32, count: usize) {
    let mut value = value;
    for i in (*len..*len + count).rev() {
        // `value % 10` is a digit: the cast cannot truncate.
        buf[i] = b'0' + (value % 10) as u8;
        value /= 10;
    }
    *len += count;
}

/// Serializes `at` as chrono's serde does, without `core::fmt`.
pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0; MAX_LEN];
    match write(at, &mut buf).and_then(|len| std::str::from_utf8(&buf[..len]).ok()) {
        Some(text) => serializer.serialize_str(text),
        None => at.serialize(serializer),
    }
}

/// The same for an optional timestamp (`null` when absent).
pub mod option {
    use chrono::{DateTime, Utc};
    use serde::Serializer;

    /// Serializes `at` as chrono's serde does, `None` as `null`.
    pub fn serialize<S: Serializer>(
        at: &Option<DateTime<Utc>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => super::serialize(at, serializer),
            None => serializer.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed test.

    use chrono::{NaiveDate, TimeZone};

    use super::*;

    #[derive(Serialize)]
    struct Ours(#[serde(serialize_with = "serialize")] DateTime<Utc>);

    #[derive(Serialize)]
    struct OursOption(#[serde(serialize_with = "option::serialize")] Option<DateTime<Utc>>);

    fn same_as_chrono(at: DateTime<Utc>) {
        assert_eq!(
            serde_json::to_string(&Ours(at)).unwrap(),
            serde_json::to_string(&at).unwrap(),
            "{at:?}"
        );
    }

    fn at(year: i32, month: u32, day: u32, h: u32, m: u32, s: u32, nano: u32) -> DateTime<Utc> {
        let naive = NaiveDate::from_ymd_opt(year, month, day)
            .unwrap()
            .and_hms_nano_opt(h, m, s, nano)
            .unwrap();
        Utc.from_utc_datetime(&naive)
    }

    #[test]
    fn every_fraction_width_and_the_edges_are_written_as_chrono_writes_them() {
        for nano in [
            0,
            1,
            999_999_999,
            500_000_000,
            120_000_000,
            7_000,
            123_456_000,
            100,
            123_456_789,
            1_000_000,
        ] {
            same_as_chrono(at(2026, 12, 7, 3, 4, 5, nano));
        }
        // Leap seconds, the ends of the four-digit years, and years chrono writes
        // with a sign (left to it).
        same_as_chrono(at(2016, 12, 31, 23, 59, 59, 1_000_000_000));
        same_as_chrono(at(2016, 12, 31, 23, 59, 59, 1_500_000_000));
        same_as_chrono(at(0, 1, 1, 0, 0, 0, 0));
        same_as_chrono(at(9999, 12, 31, 23, 59, 59, 999_999_999));
        same_as_chrono(at(10_000, 1, 1, 0, 0, 0, 0));
        same_as_chrono(at(-1, 6, 15, 12, 0, 0, 5_000_000));
    }

    #[test]
    fn a_hundred_thousand_timestamps_are_written_as_chrono_writes_them() {
        // A fixed sequence (no randomness in tests), spread over years 1970–2100 and
        // every kind of fraction.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..100_000 {
            let seconds = i64::try_from(next() % 4_102_444_800).unwrap();
            let nano = match next() % 4 {
                0 => 0,
                1 => (next() % 1_000) as u32 * 1_000_000,
                2 => (next() % 1_000_000) as u32 * 1_000,
                _ => (next() % 1_000_000_000) as u32,
            };
            same_as_chrono(Utc.timestamp_opt(seconds, nano).unwrap());
        }
    }

    #[test]
    fn an_absent_timestamp_is_null() {
        assert_eq!(serde_json::to_string(&OursOption(None)).unwrap(), "null");
        let at = at(2026, 1, 2, 3, 4, 5, 6_000);
        assert_eq!(
            serde_json::to_string(&OursOption(Some(at))).unwrap(),
            serde_json::to_string(&Some(at)).unwrap()
        );
    }
}
