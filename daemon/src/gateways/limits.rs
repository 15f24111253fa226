//! The rate limits of one gateway instance (governor token buckets): outbound per
//! instance, counted in SMS segments (messages, for other kinds); outbound per
//! recipient; caremsg's automatic answers per sender (`auto_answers_per_sender`: HELP
//! replies, wrong-date-of-birth replies, answers to unknown numbers — never the texts
//! themselves, which are always stored, nor the keywords' effects). A reload rebuilds only the limiters whose settings
//! changed, so an unchanged limit keeps its state.
//!
//! Limiters run on governor's monotonic clock, not on the daemon's injected
//! [`Clock`](crate::clock::Clock): a provider's allowed rate is about real seconds.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use caremsg_config::{Gateway, RateLimit};
use governor::clock::Clock as _;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The longest refill period a limit may have: a `per_second` so small that one token
/// takes longer is treated as one token a year.
const LONGEST_PERIOD: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// What a limiter said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Go ahead; the tokens are taken.
    Allowed,
    /// Not now; try again after this long.
    Wait(Duration),
}

/// One limit as configured, with its limiter.
struct Limit<L> {
    /// The settings it was built from.
    config: Option<RateLimit>,
    /// `None`: unlimited.
    limiter: Option<Arc<L>>,
}

impl<L> Clone for Limit<L> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            limiter: self.limiter.clone(),
        }
    }
}

/// The limiters of one instance. Swapped whole on reload (see [`Limits::rebuilt`]).
pub(crate) struct Limits {
    /// Outbound cells (segments or messages) per second of the whole instance.
    instance: Limit<DefaultDirectRateLimiter>,
    /// Outbound messages per second to one recipient.
    per_recipient: Limit<DefaultKeyedRateLimiter<String>>,
    /// Automatic answers per second to one sender.
    answers_per_sender: Limit<DefaultKeyedRateLimiter<String>>,
}

fn quota(limit: &RateLimit) -> Option<Quota> {
    let burst = NonZeroU32::new(limit.burst.max(1))?;
    if !(limit.per_second.is_finite() && limit.per_second > 0.0) {
        // Validation refuses this; be unlimited rather than panic if it slips through.
        return None;
    }
    let period = Duration::try_from_secs_f64(1.0 / limit.per_second)
        .unwrap_or(LONGEST_PERIOD)
        .min(LONGEST_PERIOD);
    // `with_period` refuses a zero period (a rate beyond a billion per second): unlimited.
    Quota::with_period(period).map(|q| q.allow_burst(burst))
}

fn direct(config: Option<&RateLimit>) -> Limit<DefaultDirectRateLimiter> {
    Limit {
        config: config.cloned(),
        limiter: config
            .and_then(quota)
            .map(|q| Arc::new(RateLimiter::direct(q))),
    }
}

fn keyed(config: Option<&RateLimit>) -> Limit<DefaultKeyedRateLimiter<String>> {
    Limit {
        config: config.cloned(),
        limiter: config
            .and_then(quota)
            .map(|q| Arc::new(RateLimiter::keyed(q))),
    }
}

fn check_keyed(limit: &Limit<DefaultKeyedRateLimiter<String>>, key: &str) -> Check {
    let Some(limiter) = &limit.limiter else {
        return Check::Allowed;
    };
    match limiter.check_key(&key.to_owned()) {
        Ok(()) => Check::Allowed,
        Err(not_until) => Check::Wait(not_until.wait_time_from(limiter.clock().now())),
    }
}

impl Limits {
    /// The limiters `gateway` configures.
    pub(crate) fn new(gateway: &Gateway) -> Self {
        Self {
            instance: direct(gateway.rate_limit.as_ref()),
            per_recipient: keyed(gateway.per_recipient.as_ref()),
            answers_per_sender: keyed(gateway.auto_answers_per_sender.as_ref()),
        }
    }

    /// New limiters for changed settings, keeping those whose settings did not change;
    /// `None` when nothing changed.
    pub(crate) fn rebuilt(&self, gateway: &Gateway) -> Option<Self> {
        let same = |a: &Option<RateLimit>, b: &Option<RateLimit>| a == b;
        let unchanged = same(&self.instance.config, &gateway.rate_limit)
            && same(&self.per_recipient.config, &gateway.per_recipient)
            && same(
                &self.answers_per_sender.config,
                &gateway.auto_answers_per_sender,
            );
        if unchanged {
            return None;
        }
        Some(Self {
            instance: if same(&self.instance.config, &gateway.rate_limit) {
                self.instance.clone()
            } else {
                direct(gateway.rate_limit.as_ref())
            },
            per_recipient: if same(&self.per_recipient.config, &gateway.per_recipient) {
                self.per_recipient.clone()
            } else {
                keyed(gateway.per_recipient.as_ref())
            },
            answers_per_sender: if same(
                &self.answers_per_sender.config,
                &gateway.auto_answers_per_sender,
            ) {
                self.answers_per_sender.clone()
            } else {
                keyed(gateway.auto_answers_per_sender.as_ref())
            },
        })
    }

    /// Takes `cells` outbound tokens of the instance. A text of more segments than the
    /// burst waits for a full bucket and then takes it all.
    pub(crate) fn check_instance(&self, cells: u32) -> Check {
        let Some(limiter) = &self.instance.limiter else {
            return Check::Allowed;
        };
        let burst = self.instance.config.as_ref().map_or(1, |c| c.burst.max(1));
        let Some(n) = NonZeroU32::new(cells.clamp(1, burst)) else {
            return Check::Allowed;
        };
        match limiter.check_n(n) {
            Ok(Ok(())) => Check::Allowed,
            Ok(Err(not_until)) => Check::Wait(not_until.wait_time_from(limiter.clock().now())),
            // `n` is at most the burst, so the bucket can always hold it.
            Err(_) => Check::Allowed,
        }
    }

    /// Takes one outbound token for `recipient`.
    pub(crate) fn check_recipient(&self, recipient: &str) -> Check {
        check_keyed(&self.per_recipient, recipient)
    }

    /// Takes one automatic-answer token for `sender` (a text caremsg would send on its
    /// own in answer to one of theirs).
    pub(crate) fn check_answer(&self, sender: &str) -> Check {
        check_keyed(&self.answers_per_sender, sender)
    }

    /// Forgets keys whose buckets are full again (bounded memory for keyed limits).
    pub(crate) fn forget_idle_keys(&self) {
        for limit in [&self.per_recipient, &self.answers_per_sender] {
            if let Some(limiter) = &limit.limiter {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use caremsg_config::GatewayKind;

    fn gateway(rate: Option<(f64, u32)>, per_recipient: Option<(f64, u32)>) -> Gateway {
        let limit = |(per_second, burst)| RateLimit { per_second, burst };
        Gateway {
            name: "g".into(),
            kind: GatewayKind::Sms,
            library: "x.so".into(),
            config: serde_json::json!({}),
            concurrency: 1,
            allowed_hosts: vec![],
            rate_limit: rate.map(limit),
            per_recipient: per_recipient.map(limit),
            auto_answers_per_sender: None,
            health_interval: std::time::Duration::from_secs(30),
            down_fails_readiness: false,
        }
    }

    #[test]
    fn instance_limit_counts_cells_and_caps_at_the_burst() {
        let limits = Limits::new(&gateway(Some((0.001, 5)), None));
        assert_eq!(limits.check_instance(2), Check::Allowed);
        assert_eq!(limits.check_instance(3), Check::Allowed);
        assert!(matches!(limits.check_instance(1), Check::Wait(_)));
        // A text longer than the burst is not refused forever.
        let limits = Limits::new(&gateway(Some((1000.0, 2)), None));
        assert_eq!(limits.check_instance(9), Check::Allowed);
    }

    #[test]
    fn unlimited_when_not_configured() {
        let limits = Limits::new(&gateway(None, None));
        for _ in 0..10_000 {
            assert_eq!(limits.check_instance(3), Check::Allowed);
            assert_eq!(limits.check_recipient("+15550100"), Check::Allowed);
        }
    }

    #[test]
    fn per_recipient_is_keyed() {
        let limits = Limits::new(&gateway(None, Some((0.001, 1))));
        assert_eq!(limits.check_recipient("a"), Check::Allowed);
        assert!(matches!(limits.check_recipient("a"), Check::Wait(_)));
        assert_eq!(limits.check_recipient("b"), Check::Allowed);
    }

    #[test]
    fn rebuild_keeps_unchanged_limiters() {
        let limits = Limits::new(&gateway(Some((0.001, 1)), Some((0.001, 1))));
        assert_eq!(limits.check_instance(1), Check::Allowed);
        assert_eq!(limits.check_recipient("a"), Check::Allowed);
        assert!(
            limits
                .rebuilt(&gateway(Some((0.001, 1)), Some((0.001, 1))))
                .is_none()
        );
        let rebuilt = limits
            .rebuilt(&gateway(Some((0.001, 3)), Some((0.001, 1))))
            .expect("changed");
        // The instance limiter is new (full again), the per-recipient one kept its state.
        assert_eq!(rebuilt.check_instance(1), Check::Allowed);
        assert!(matches!(rebuilt.check_recipient("a"), Check::Wait(_)));
    }
}
