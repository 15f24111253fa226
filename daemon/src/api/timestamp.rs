//! Timestamps in answers and event streams: [`crate::rfc3339`]'s text with `Z`, byte
//! for byte what chrono's serde writes for a `DateTime<Utc>`, without its `core::fmt`
//! (more than half of what rendering a notification for a staff stream cost). Use with
//! `#[serde(serialize_with = "timestamp::serialize")]` (or `timestamp::option::serialize`).

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};

use crate::rfc3339::{self, Zone};

/// Serializes `at` as chrono's serde does, without `core::fmt`.
pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0; rfc3339::MAX_LEN];
    match rfc3339::write(at, Zone::Z, &mut buf) {
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

    use super::*;
    use crate::rfc3339::tests::at;

    #[derive(Serialize)]
    struct Ours(#[serde(serialize_with = "serialize")] DateTime<Utc>);

    #[derive(Serialize)]
    struct OursOption(#[serde(serialize_with = "option::serialize")] Option<DateTime<Utc>>);

    #[test]
    fn a_timestamp_is_serialized_as_chrono_serializes_it_and_an_absent_one_is_null() {
        // rfc3339's tests compare the text itself; these, what serde receives, also
        // for a year left to chrono.
        for at in [
            at(2026, 1, 2, 3, 4, 5, 6_000),
            at(2026, 12, 7, 0, 0, 0, 0),
            at(10_000, 1, 1, 0, 0, 0, 0),
        ] {
            assert_eq!(
                serde_json::to_string(&Ours(at)).unwrap(),
                serde_json::to_string(&at).unwrap()
            );
            assert_eq!(
                serde_json::to_string(&OursOption(Some(at))).unwrap(),
                serde_json::to_string(&Some(at)).unwrap()
            );
        }
        assert_eq!(serde_json::to_string(&OursOption(None)).unwrap(), "null");
    }
}
