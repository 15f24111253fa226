//! When a delivery is tried again: exponential back-off with full jitter, never before
//! the provider's `retry_after`, and spread so that no two retries of one instance
//! fall within 1 ms of each other (a storm of failures does not come back as a storm).

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use rand::Rng;

/// The back-off window of the first retry; it doubles with every attempt.
pub const RETRY_BASE: Duration = Duration::from_secs(2);

/// The largest back-off window.
pub const RETRY_CAP: Duration = Duration::from_secs(15 * 60);

/// How long after its creation a delivery may still be retried; a retryable error
/// after that fails it. The settings have no field for it (`[[gateways]]` is fixed by
/// the config crate), so it is this constant: a day covers a provider's outage of a
/// working day without texting a patient about yesterday's news.
pub const MAX_RETRY_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// The longest wait a provider's `Retry-After` may impose: a larger (or absurd) value
/// is clamped to it before it becomes a pause or a retry instant, so it can never
/// overflow a time computation.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);

/// `outcome` with its `retry_after`, if any, clamped to [`MAX_RETRY_AFTER`].
pub fn clamp_retry_after(
    outcome: caremsg_plugin_host::SendOutcome,
) -> caremsg_plugin_host::SendOutcome {
    match outcome {
        caremsg_plugin_host::SendOutcome::Retryable {
            after,
            code,
            reason,
        } => caremsg_plugin_host::SendOutcome::Retryable {
            after: after.map(|after| after.min(MAX_RETRY_AFTER)),
            code,
            reason,
        },
        other => other,
    }
}

/// Closest two retry instants handed out by one [`Spreader`] may be, in milliseconds.
const MIN_GAP_MS: i64 = 2;

/// How long past instants are remembered (retries due longer ago are already taken).
const REMEMBER_MS: i64 = 1_000;

/// The back-off window of attempt `attempt` (1 for the first try): `RETRY_BASE`
/// doubled per earlier attempt, at most `RETRY_CAP`.
pub fn window(attempt: i32) -> Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(20);
    RETRY_BASE.saturating_mul(1u32 << doublings).min(RETRY_CAP)
}

/// Hands out retry instants of one gateway instance, at least [`MIN_GAP_MS`] apart.
/// Only a spreading aid: it remembers recent instants in memory, and losing them (a
/// restart) loses nothing but the spreading of retries due in the next second.
#[derive(Debug, Default)]
pub struct Spreader {
    /// Instants handed out (milliseconds since the epoch) that are not long past.
    taken: BTreeSet<i64>,
}

impl Spreader {
    /// A retry instant: `now + after + uniform(1 ms, window)`, moved later by whole
    /// milliseconds until it is at least 2 ms from every instant handed out before.
    pub fn pick(
        &mut self,
        now: DateTime<Utc>,
        after: Duration,
        window: Duration,
        rng: &mut impl Rng,
    ) -> DateTime<Utc> {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX / 4);
        let after_ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX / 4);
        // At least 1 ms: a retry is never due in the instant it was scheduled.
        let jitter = rng.random_range(1..=window_ms.max(1));
        let now_ms = now.timestamp_millis();
        let mut at = now_ms.saturating_add(after_ms).saturating_add(jitter);
        let forget_before = now_ms - REMEMBER_MS;
        self.taken = self.taken.split_off(&forget_before);
        while self
            .taken
            .range(at - (MIN_GAP_MS - 1)..=at + (MIN_GAP_MS - 1))
            .next()
            .is_some()
        {
            at += 1;
        }
        self.taken.insert(at);
        DateTime::from_timestamp_millis(at)
            .unwrap_or_else(|| now + TimeDelta::milliseconds(after_ms.saturating_add(jitter)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn start() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-02T15:00:00Z")
            .unwrap()
            .to_utc()
    }

    #[test]
    fn window_doubles_up_to_the_cap() {
        let check = |attempt, secs| assert_eq!(window(attempt), Duration::from_secs(secs));
        check(0, 2);
        check(1, 2);
        check(2, 4);
        check(5, 32);
        check(10, 15 * 60);
        check(i32::MAX, 15 * 60);
    }

    #[test]
    fn instants_honour_retry_after_and_stay_in_the_window() {
        let mut spreader = Spreader::default();
        let mut rng = rand::rng();
        for _ in 0..200 {
            let at = spreader.pick(
                start(),
                Duration::from_secs(3),
                Duration::from_secs(2),
                &mut rng,
            );
            assert!(at > start() + TimeDelta::seconds(3), "{at}");
            assert!(at <= start() + TimeDelta::seconds(6), "{at}");
        }
    }

    #[test]
    fn a_storm_is_spread_at_least_2_ms_apart() {
        let mut spreader = Spreader::default();
        let mut rng = rand::rng();
        // Even with no jitter at all, every instant is distinct by 2 ms.
        let mut all: Vec<i64> = (0..1000)
            .map(|_| {
                spreader
                    .pick(start(), Duration::from_secs(1), Duration::ZERO, &mut rng)
                    .timestamp_millis()
            })
            .collect();
        all.sort_unstable();
        assert!(all.windows(2).all(|w| w[1] - w[0] >= 2));
    }
}
