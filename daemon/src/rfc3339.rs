//! UTC timestamps as RFC 3339 text, written byte for byte as chrono writes them with
//! `SecondsFormat::AutoSi` (a fraction of a second of 3, 6 or 9 digits, the fewest
//! that hold it exactly, or none), but straight into a stack buffer. chrono goes
//! through `core::fmt`: about 2,800 instructions a timestamp in serde_json's
//! `collect_str`, against about 185 here (callgrind).
//!
//! Two users, two ways of writing UTC: the API's answers and stream events write `Z`
//! (chrono's serde form; `api::timestamp`), and the SQLite writer binds `+00:00`
//! (what sqlx binds, which the readers compare with; `writer::sqlite`).
//!
//! A year outside 0–9999 is left to chrono (it writes a sign): none is stored, but the
//! text stays chrono's either way.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};

/// How UTC is written after the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// `Z`, as chrono's serde writes it.
    Z,
    /// `+00:00`, as `to_rfc3339_opts(AutoSi, false)` writes it.
    Offset,
}

/// The longest text: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn+00:00`.
pub const MAX_LEN: usize = 35;

/// `at` written into `buf`; `None` for a year this does not write (outside 0–9999),
/// which chrono then writes ([`to_string`] does).
pub fn write<'b>(at: &DateTime<Utc>, zone: Zone, buf: &'b mut [u8; MAX_LEN]) -> Option<&'b str> {
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
    let zone: &[u8] = match zone {
        Zone::Z => b"Z",
        Zone::Offset => b"+00:00",
    };
    buf[len..len + zone.len()].copy_from_slice(zone);
    std::str::from_utf8(&buf[..len + zone.len()]).ok()
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

/// `at` as text, [`write`]'s or, for a year it does not write, chrono's.
pub fn to_string(at: &DateTime<Utc>, zone: Zone) -> String {
    let mut buf = [0; MAX_LEN];
    match write(at, zone, &mut buf) {
        Some(text) => text.to_owned(),
        None => at.to_rfc3339_opts(SecondsFormat::AutoSi, zone == Zone::Z),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed test.

    use chrono::{NaiveDate, TimeZone};

    use super::*;

    /// Both zones as chrono writes them: `Z` as its serde form (what the API wrote
    /// before), `+00:00` as `to_rfc3339_opts(AutoSi, false)` (what the writer bound).
    fn same_as_chrono(at: DateTime<Utc>) {
        assert_eq!(
            format!("\"{}\"", to_string(&at, Zone::Z)),
            serde_json::to_string(&at).unwrap(),
            "{at:?}"
        );
        assert_eq!(
            to_string(&at, Zone::Offset),
            at.to_rfc3339_opts(SecondsFormat::AutoSi, false),
            "{at:?}"
        );
    }

    pub(crate) fn at(
        year: i32,
        month: u32,
        day: u32,
        h: u32,
        m: u32,
        s: u32,
        nano: u32,
    ) -> DateTime<Utc> {
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
        let mut buf = [0; MAX_LEN];
        assert_eq!(
            write(&at(10_000, 1, 1, 0, 0, 0, 0), Zone::Z, &mut buf),
            None
        );
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
}
