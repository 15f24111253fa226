//! Plugin health, read by the daemon: every instance's `health` is polled (every
//! `health_interval`, on the blocking pool under the instance's concurrency limit,
//! like any plugin call), kept on the instance for `/readyz`, exported as the
//! `caremsg_gateway_health{gateway}` gauge and logged when it changes.
//!
//! A failed health call (a panic, a stopped instance) counts as down.

use std::sync::Arc;
use std::time::Duration;

use caremsg_plugin_host::Health;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use super::host::scrub;
use super::instance::GatewayInstance;
use crate::metrics::{GatewayHealthLabels, Metrics};
use crate::state::Shared;

/// Used when an instance's settings cannot be found (it was just removed).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// What a plugin said about itself at the last poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Working.
    Ok,
    /// Working with reduced capacity.
    Degraded,
    /// Not working (or its health call failed).
    Down,
}

impl HealthState {
    /// The value of `caremsg_gateway_health`: 2 ok, 1 degraded, 0 down.
    pub fn gauge(self) -> i64 {
        match self {
            HealthState::Ok => 2,
            HealthState::Degraded => 1,
            HealthState::Down => 0,
        }
    }
}

/// The last health report of one instance, as `/readyz` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct GatewayHealth {
    /// `ok`, `degraded` or `down`.
    pub health: HealthState,
    /// Why it is degraded or down, in the plugin's words (scrubbed like its log lines).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl GatewayHealth {
    fn of(health: Health) -> Self {
        let (health, detail) = match health {
            Health::Ok => (HealthState::Ok, None),
            Health::Degraded(why) => (HealthState::Degraded, Some(why)),
            Health::Down(why) => (HealthState::Down, Some(why)),
        };
        GatewayHealth {
            health,
            detail: detail.map(|d| scrub(&d)),
        }
    }
}

/// Asks `instance` for its health once, records the answer on the instance and in
/// `metrics`, and logs a change. Returns the answer.
pub(crate) async fn poll(instance: &GatewayInstance, metrics: &Metrics) -> GatewayHealth {
    let report = match instance.call(|i| i.health()).await {
        Ok(health) => GatewayHealth::of(health),
        Err(error) => GatewayHealth {
            health: HealthState::Down,
            detail: Some(format!("the health call failed: {error}")),
        },
    };
    metrics
        .gateway_health
        .get_or_create(&GatewayHealthLabels {
            gateway: instance.name().to_owned(),
        })
        .set(report.health.gauge());
    let before = instance.set_health(report.clone());
    if before.as_ref() != Some(&report) {
        let gateway = instance.name();
        let detail = report.detail.as_deref().unwrap_or("");
        match (report.health, before.map(|b| b.health)) {
            (HealthState::Ok, None) => {
                tracing::info!(gateway, "The gateway plugin reports itself healthy.");
            }
            (HealthState::Ok, Some(_)) => {
                tracing::info!(gateway, "The gateway plugin is healthy again.");
            }
            (HealthState::Degraded, _) => {
                tracing::warn!(
                    gateway,
                    detail,
                    "The gateway plugin reports itself degraded."
                );
            }
            (HealthState::Down, _) => {
                tracing::error!(gateway, detail, "The gateway plugin reports itself down.");
            }
        }
    }
    report
}

/// Polls `instance` until `stop`: at once, then every `health_interval` of its
/// current settings (so a reload changes the period from the next poll on).
pub(crate) async fn run(state: Shared, instance: Arc<GatewayInstance>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = poll(&instance, &state.metrics) => {}
            () = stop.cancelled() => break,
        }
        let interval = state
            .settings
            .load()
            .gateways
            .iter()
            .find(|g| g.name == instance.name())
            .map_or(DEFAULT_INTERVAL, |g| g.health_interval);
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_map_to_states_and_gauge_values() {
        let cases = [
            (Health::Ok, HealthState::Ok, None, 2),
            (
                Health::Degraded("slow".into()),
                HealthState::Degraded,
                Some("slow"),
                1,
            ),
            (
                Health::Down("key revoked for +15550100123".into()),
                HealthState::Down,
                Some("key revoked for [redacted]"),
                0,
            ),
        ];
        for (health, state, detail, gauge) in cases {
            let report = GatewayHealth::of(health);
            assert_eq!(report.health, state);
            assert_eq!(report.detail.as_deref(), detail);
            assert_eq!(report.health.gauge(), gauge);
        }
    }
}
