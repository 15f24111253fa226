//! One configured gateway instance: its loaded plugin and started [`Instance`], the
//! concurrency limit every call runs under, its rate limits and its push-back pause.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use caremsg_config::{Gateway, GatewayKind};
use caremsg_plugin_host::{CallError, HostServices, Instance, Plugin};
use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;

use super::health::GatewayHealth;
use super::limits::Limits;

/// A started gateway instance, shared by its dispatcher, the webhook route and the
/// inbound task.
pub struct GatewayInstance {
    /// The configured name: the `gateway` of its deliveries and the hook path segment.
    name: String,
    /// What it carries, as configured (checked against the plugin's kind at load).
    kind: GatewayKind,
    /// The library, kept to start a new instance when a reload changes `config`.
    plugin: Plugin,
    /// The running instance; swapped when a reload restarts it with a new `config`.
    current: ArcSwap<Instance>,
    /// At most `concurrency` calls at once, each on tokio's blocking pool.
    permits: Arc<Semaphore>,
    /// Rate limits; replaced when a reload changes them.
    limits: ArcSwap<Limits>,
    /// While set and in the future (daemon clock), the provider pushed back: no sends.
    paused_until: Mutex<Option<DateTime<Utc>>>,
    /// Given to a restarted instance.
    services: Arc<dyn HostServices>,
    /// The reload whose `config` runs now; serialises restarts.
    restarted: Mutex<u64>,
    /// The plugin's answer at the last health poll; `None` before the first.
    health: Mutex<Option<GatewayHealth>>,
}

impl std::fmt::Debug for GatewayInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayInstance")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("plugin", &self.plugin.name())
            .finish_non_exhaustive()
    }
}

impl GatewayInstance {
    pub(crate) fn new(
        gateway: &Gateway,
        plugin: Plugin,
        instance: Instance,
        services: Arc<dyn HostServices>,
    ) -> Self {
        Self {
            name: gateway.name.clone(),
            kind: gateway.kind,
            plugin,
            current: ArcSwap::from_pointee(instance),
            permits: Arc::new(Semaphore::new(gateway.concurrency.max(1))),
            limits: ArcSwap::from_pointee(Limits::new(gateway)),
            paused_until: Mutex::new(None),
            services,
            restarted: Mutex::new(0),
            health: Mutex::new(None),
        }
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What it carries.
    pub fn kind(&self) -> GatewayKind {
        self.kind
    }

    /// The loaded plugin.
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// Whether a send whose outcome is unknown (the daemon stopped mid-call) may be
    /// sent again because the provider deduplicates by the idempotency key. ABI 1.0
    /// has no way for a plugin to declare that, so the answer is no: such deliveries
    /// are marked `reconcile`. When an ABI minor adds the declaration, read it here.
    pub fn supports_idempotency(&self) -> bool {
        false
    }

    /// Runs `call` on the running instance, on tokio's blocking pool, under the
    /// instance's concurrency limit. A panic of host code around the call is reported
    /// like a plugin panic.
    pub async fn call<T, F>(&self, call: F) -> Result<T, CallError>
    where
        F: FnOnce(&Instance) -> Result<T, CallError> + Send + 'static,
        T: Send + 'static,
    {
        self.call_if(|| true, call)
            .await
            .unwrap_or(Err(CallError::Stopped))
    }

    /// Like [`GatewayInstance::call`], but asks `proceed` once a concurrency permit is
    /// held, right before the call, and makes no call (`None`) if it says no: a send
    /// that waited for its turn sees a pause the provider asked for meanwhile.
    pub async fn call_if<T, F>(
        &self,
        proceed: impl FnOnce() -> bool,
        call: F,
    ) -> Option<Result<T, CallError>>
    where
        F: FnOnce(&Instance) -> Result<T, CallError> + Send + 'static,
        T: Send + 'static,
    {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return Some(Err(CallError::Stopped));
        };
        if !proceed() {
            return None;
        }
        let instance = self.current.load_full();
        Some(
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                call(&instance)
            })
            .await
            .unwrap_or(Err(CallError::Panicked { call: "host" })),
        )
    }

    pub(crate) fn limits(&self) -> arc_swap::Guard<Arc<Limits>> {
        self.limits.load()
    }

    /// Applies changed rate limits; returns whether any changed.
    pub(crate) fn reload_limits(&self, gateway: &Gateway) -> bool {
        match self.limits.load().rebuilt(gateway) {
            Some(limits) => {
                self.limits.store(Arc::new(limits));
                true
            }
            None => false,
        }
    }

    /// The plugin's answer at the last health poll; `None` before the first.
    pub fn health(&self) -> Option<GatewayHealth> {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records a health answer; returns the previous one.
    pub(crate) fn set_health(&self, report: GatewayHealth) -> Option<GatewayHealth> {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(report)
    }

    /// Until when the provider asked for a pause, if that is after `now`.
    pub fn paused_until(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .filter(|until| *until > now)
    }

    /// Pauses sending until `until` (a later pause wins over an earlier one).
    pub(crate) fn pause(&self, until: DateTime<Utc>) {
        let mut paused = self
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
        }
    }

    /// Starts a new instance with `config_json` and retires the old one (it finishes
    /// its calls in flight first), unless a restart of a later reload (`generation`)
    /// already ran: returns whether it restarted. Blocking: call it on the blocking
    /// pool. The old instance stays if the plugin refuses the new configuration.
    pub(crate) fn restart_blocking(
        &self,
        config_json: &str,
        generation: u64,
    ) -> Result<bool, String> {
        let mut applied = self
            .restarted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *applied >= generation {
            return Ok(false);
        }
        let fresh = self
            .plugin
            .start(&self.name, config_json, self.services.clone())
            .map_err(|error| error.to_string())?;
        *applied = generation;
        let old = self.current.swap(Arc::new(fresh));
        match old.stop() {
            Ok(()) | Err(CallError::Stopped) => Ok(true),
            Err(error) => Err(format!("the old instance failed while stopping: {error}")),
        }
    }

    /// Stops the running instance (waits for its calls in flight). Blocking.
    pub(crate) fn stop_blocking(&self) {
        match self.current.load().stop() {
            Ok(()) | Err(CallError::Stopped) => {}
            Err(error) => {
                tracing::warn!(gateway = %self.name, %error, "The gateway plugin failed while stopping.");
            }
        }
    }
}
