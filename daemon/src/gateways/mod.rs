//! Gateways: the plugin instances the daemon loads at start, the outbox dispatchers
//! that send stored deliveries through them, and the inbound side that commits what
//! they report.
//!
//! ```text
//! [[gateways]] ─load─► GatewayInstance ─┬─ outbox::Dispatcher (a task each): deliveries ─► send
//!                                        ├─ POST /v1/hooks/{name} (api::hooks) ─► handle_webhook ─► inbound::commit ─► answer
//!                                        └─ emit ─► bounded channel ─► inbound task ─► inbound::commit
//! ```
//!
//! - [`Gateways::load`] opens every configured library (a file that cannot be loaded
//!   stops the start with a message naming it) and starts its instance with its JSON
//!   configuration and the daemon's [`host::Services`]. Libraries are never unloaded.
//! - Every plugin call runs on tokio's blocking pool under the instance's
//!   `Semaphore(concurrency)` ([`GatewayInstance::call`]), never on an async worker.
//! - [`Gateways::start`] marks deliveries interrupted by the last stop `reconcile`,
//!   then starts the dispatchers, the inbound task and the waker that pokes the
//!   dispatchers on every stored message. [`Gateways::reload`] applies a reload:
//!   changed rate limits are rebuilt, allow-lists replaced, and an instance whose
//!   `config` changed is restarted with it. [`Gateways::shutdown`] stops them.
//!
//! **Architecture Invariant:** a delivery is `sending` only while the daemon runs a
//! plugin call for it; the claim is committed before the call and the outcome after.
//!
//! **Architecture Invariant:** inbound events are committed before the provider (or
//! the emitting plugin) is told they were taken.

pub mod bench;
pub mod consent;
pub mod health;
mod host;
pub mod inbound;
mod instance;
pub(crate) mod limits;
pub mod outbox;
pub mod retry;

pub(crate) use host::hook_url;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use caremsg_config::{GatewayKind, Settings};
use caremsg_plugin_host::{HostServices, HyperHttp, Kind, LoadError, StartError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use self::host::Emitted;
pub use self::instance::GatewayInstance;
use self::outbox::Dispatcher;
use crate::clock::SharedClock;
use crate::state::Shared;

/// Most events plugins may have emitted and not yet committed; beyond it `emit`
/// answers busy.
pub const EMIT_QUEUE: usize = 1024;

/// Timeout (and ceiling) of a plugin's HTTP request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the gateways could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A library could not be loaded; the message names the file.
    #[error("gateway {name}: {source}")]
    Load {
        /// The instance.
        name: String,
        /// Why.
        source: LoadError,
    },
    /// The library is not the kind the configuration says.
    #[error(
        "gateway {name}: {path} is a {actual} plugin, but the configuration says kind = \"{configured}\""
    )]
    WrongKind {
        /// The instance.
        name: String,
        /// The library.
        path: String,
        /// What the plugin declares.
        actual: Kind,
        /// What the configuration says.
        configured: &'static str,
    },
    /// The plugin refused to start (usually its configuration).
    #[error("gateway {name} ({path}): {source}")]
    Start {
        /// The instance.
        name: String,
        /// The library.
        path: String,
        /// Why.
        source: StartError,
    },
    /// The loading thread failed.
    #[error("loading the gateways failed: {0}")]
    Join(String),
}

/// The configured kind's name, as in the configuration.
fn kind_name(kind: GatewayKind) -> &'static str {
    match kind {
        GatewayKind::Sms => "sms",
        GatewayKind::Portal => "portal",
        GatewayKind::Email => "email",
    }
}

fn plugin_kind(kind: GatewayKind) -> Kind {
    match kind {
        GatewayKind::Sms => Kind::Sms,
        GatewayKind::Portal => Kind::Portal,
        GatewayKind::Email => Kind::Email,
    }
}

/// Every gateway instance of the running daemon and what drives them.
pub struct Gateways {
    /// The instances by name.
    instances: HashMap<String, Arc<GatewayInstance>>,
    /// One dispatcher per instance, then the portal one (no gateway).
    dispatchers: Vec<Arc<Dispatcher>>,
    /// The plugins' HTTP client; its allow-lists change on reload.
    http: Arc<HyperHttp>,
    /// Emitted events, until [`Gateways::start`] hands them to the inbound task.
    emitted: Mutex<Option<mpsc::Receiver<Emitted>>>,
    /// The dispatchers, the inbound task and the waker; joined at shutdown.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Instances being restarted with a reloaded `config` ([`Gateways::settle`]).
    restarts: Mutex<Vec<JoinHandle<()>>>,
    /// Numbers reloads, so that a slow restart never replaces a newer one.
    reloads: AtomicU64,
    /// Stops the tasks.
    stop: CancellationToken,
}

impl std::fmt::Debug for Gateways {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateways")
            .field("instances", &self.instances.keys())
            .finish_non_exhaustive()
    }
}

impl Gateways {
    /// Loads every configured library and starts its instance (on the blocking pool:
    /// plugins may do I/O when they start). The first failure stops everything
    /// already started and names the instance and the file.
    ///
    /// `settings` are the live settings (plugins read `server.public_url` through
    /// `Host::hook_url`), `clock` the daemon's clock (`Host::now`).
    pub async fn load(
        settings: Arc<ArcSwap<Settings>>,
        clock: SharedClock,
    ) -> Result<Self, GatewayError> {
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || Self::load_blocking(settings, clock, runtime))
            .await
            .map_err(|error| GatewayError::Join(error.to_string()))?
    }

    fn load_blocking(
        settings: Arc<ArcSwap<Settings>>,
        clock: SharedClock,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, GatewayError> {
        let configured = settings.load().gateways.clone();
        let http = Arc::new(HyperHttp::new(runtime, HTTP_TIMEOUT));
        let (tx, rx) = mpsc::channel(EMIT_QUEUE);
        let services: Arc<dyn HostServices> = Arc::new(host::Services {
            http: http.clone(),
            emitted: tx,
            settings,
            clock,
        });
        let mut instances: HashMap<String, Arc<GatewayInstance>> = HashMap::new();
        let mut ordered = Vec::new();
        for gateway in &configured {
            let path = gateway.library.display().to_string();
            let fail = |instances: &HashMap<String, Arc<GatewayInstance>>| {
                for started in instances.values() {
                    started.stop_blocking();
                }
            };
            let plugin = match caremsg_plugin_host::load(&gateway.library) {
                Ok(plugin) => plugin,
                Err(source) => {
                    fail(&instances);
                    return Err(GatewayError::Load {
                        name: gateway.name.clone(),
                        source,
                    });
                }
            };
            if plugin.kind() != plugin_kind(gateway.kind) {
                fail(&instances);
                return Err(GatewayError::WrongKind {
                    name: gateway.name.clone(),
                    path,
                    actual: plugin.kind(),
                    configured: kind_name(gateway.kind),
                });
            }
            http.set_allowed_hosts(&gateway.name, &gateway.allowed_hosts);
            let config = gateway.config.to_string();
            let instance = match plugin.start(&gateway.name, &config, services.clone()) {
                Ok(instance) => instance,
                Err(source) => {
                    fail(&instances);
                    return Err(GatewayError::Start {
                        name: gateway.name.clone(),
                        path,
                        source,
                    });
                }
            };
            tracing::info!(
                gateway = %gateway.name,
                plugin = plugin.name(),
                version = plugin.metadata().version.as_deref().unwrap_or(""),
                library = %path,
                "Gateway plugin loaded and started."
            );
            let instance = Arc::new(GatewayInstance::new(
                gateway,
                plugin,
                instance,
                services.clone(),
            ));
            ordered.push(instance.clone());
            instances.insert(gateway.name.clone(), instance);
        }
        let mut dispatchers: Vec<Arc<Dispatcher>> = ordered
            .into_iter()
            .map(|instance| Arc::new(Dispatcher::new(Some(instance))))
            .collect();
        dispatchers.push(Arc::new(Dispatcher::new(None)));
        Ok(Self {
            instances,
            dispatchers,
            http,
            emitted: Mutex::new(Some(rx)),
            tasks: Mutex::new(Vec::new()),
            restarts: Mutex::new(Vec::new()),
            reloads: AtomicU64::new(0),
            stop: CancellationToken::new(),
        })
    }

    /// The instance named `name`.
    pub fn instance(&self, name: &str) -> Option<&Arc<GatewayInstance>> {
        self.instances.get(name)
    }

    /// The names of the instances.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.instances.keys().map(String::as_str)
    }

    /// The dispatcher of instance `name`; `None` names the portal dispatcher.
    pub fn dispatcher(&self, name: Option<&str>) -> Option<Arc<Dispatcher>> {
        self.dispatchers.iter().find(|d| d.name() == name).cloned()
    }

    /// Empties every instance's outbound bucket (a high-availability takeover).
    pub fn empty_rate_buckets(&self) {
        for instance in self.instances.values() {
            instance.limits().empty_instance_bucket();
        }
    }

    /// Asks every dispatcher for a pass: call it after committing new deliveries.
    pub fn wake(&self) {
        for dispatcher in &self.dispatchers {
            dispatcher.wake();
        }
    }

    /// Marks the deliveries the last stop interrupted `reconcile`, then starts the
    /// dispatchers, the inbound task and the waker. Call once, after the writer.
    pub async fn start(&self, state: &Shared) -> Result<(), outbox::DispatchError> {
        outbox::reconcile_interrupted(state).await?;
        self.warn_about_unknown_gateways(state).await;
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        for dispatcher in &self.dispatchers {
            tasks.push(tokio::spawn(outbox::run(
                state.clone(),
                dispatcher.clone(),
                self.stop.clone(),
            )));
        }
        let emitted = self
            .emitted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(emitted) = emitted {
            tasks.push(tokio::spawn(inbound::run_emitted(
                state.clone(),
                emitted,
                self.stop.clone(),
            )));
        }
        tasks.push(tokio::spawn(wake_on_messages(
            state.clone(),
            self.stop.clone(),
        )));
        for instance in self.instances.values() {
            tasks.push(tokio::spawn(health::run(
                state.clone(),
                instance.clone(),
                self.stop.clone(),
            )));
        }
        Ok(())
    }

    /// Polls every instance's health now and waits for the answers (what the periodic
    /// poll does, on demand: tests call it rather than wait for `health_interval`).
    pub async fn poll_health(&self, state: &Shared) {
        for instance in self.instances.values() {
            health::poll(instance, &state.metrics).await;
        }
    }

    /// Every instance's last health report, by name (`/readyz`), and the name of one
    /// that is down with `down_fails_readiness` set (in `settings`), if any.
    pub fn health_report(
        &self,
        settings: &Settings,
    ) -> (
        std::collections::BTreeMap<String, health::GatewayHealth>,
        Option<String>,
    ) {
        let mut fails = None;
        let mut report = std::collections::BTreeMap::new();
        for (name, instance) in &self.instances {
            let Some(last) = instance.health() else {
                continue;
            };
            let required = settings
                .gateways
                .iter()
                .any(|g| &g.name == name && g.down_fails_readiness);
            if required && last.health == health::HealthState::Down && fails.is_none() {
                fails = Some(name.clone());
            }
            report.insert(name.clone(), last);
        }
        (report, fails)
    }

    /// Logs queued deliveries that name a gateway no instance has: they wait until a
    /// restart configures it.
    async fn warn_about_unknown_gateways(&self, state: &Shared) {
        use caremsg_entities::{DeliveryStatus, delivery};
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
        let names: Result<Vec<Option<String>>, _> = delivery::Entity::find()
            .select_only()
            .column(delivery::Column::Gateway)
            .distinct()
            .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
            .filter(delivery::Column::Gateway.is_not_null())
            .into_tuple()
            .all(&state.db)
            .await;
        for name in names.unwrap_or_default().into_iter().flatten() {
            if !self.instances.contains_key(&name) {
                tracing::warn!(gateway = %name, "Queued deliveries name a gateway instance that is not configured; they wait until it is.");
            }
        }
    }

    /// Applies a reload: rebuilds changed rate limiters, replaces allow-lists, and
    /// restarts (on the blocking pool) each instance whose `config` changed.
    /// Instances are matched by name; the list itself cannot change on reload.
    pub fn reload(&self, old: &Settings, new: &Settings) {
        let generation = self.reloads.fetch_add(1, Ordering::Relaxed) + 1;
        for gateway in &new.gateways {
            let Some(instance) = self.instances.get(&gateway.name) else {
                continue;
            };
            if instance.reload_limits(gateway) {
                tracing::info!(gateway = %gateway.name, "Gateway rate limits reloaded.");
            }
            let before = old.gateways.iter().find(|g| g.name == gateway.name);
            if before.is_none_or(|b| b.allowed_hosts != gateway.allowed_hosts) {
                self.http
                    .set_allowed_hosts(&gateway.name, &gateway.allowed_hosts);
            }
            if before.is_some_and(|b| b.config != gateway.config) {
                let instance = instance.clone();
                let config = gateway.config.to_string();
                let restart = tokio::task::spawn_blocking(move || {
                    match instance.restart_blocking(&config, generation) {
                        Ok(true) => {
                            tracing::info!(gateway = %instance.name(), "Gateway restarted with its reloaded configuration.");
                        }
                        Ok(false) => {}
                        Err(error) => {
                            tracing::error!(gateway = %instance.name(), %error, "The gateway refused its reloaded configuration; it runs on with the previous one.");
                        }
                    }
                });
                self.restarts
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(restart);
            }
        }
        self.wake();
    }

    /// Waits until every instance a reload restarted runs on its new configuration
    /// (or refused it).
    pub async fn settle(&self) {
        let restarts: Vec<JoinHandle<()>> = self
            .restarts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for restart in restarts {
            if let Err(error) = restart.await {
                tracing::error!(%error, "A gateway restart ended abnormally.");
            }
        }
    }

    /// Stops the dispatchers (each finishes recording the pass in progress, for at
    /// most `grace`), the inbound task (after committing what was emitted), then
    /// every plugin instance. Rows a cut-off pass left `sending` are reconciled at
    /// the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(grace, self.settle()).await.is_err() {
            tracing::warn!("A gateway restart was still running at the end of the grace period.");
        }
        let tasks: Vec<JoinHandle<()>> = self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(grace, futures::future::join_all(tasks))
            .await
            .is_err()
        {
            tracing::warn!(
                "Gateway work was still running at the end of the grace period; it was cut off."
            );
            for abort in aborts {
                abort.abort();
            }
        }
        let instances: Vec<Arc<GatewayInstance>> = self.instances.values().cloned().collect();
        let stopped = tokio::task::spawn_blocking(move || {
            for instance in instances {
                instance.stop_blocking();
            }
        });
        if tokio::time::timeout(grace, stopped).await.is_err() {
            tracing::warn!("Gateway plugins did not stop within the grace period.");
        }
    }
}

/// Pokes every dispatcher when a committed change may have queued deliveries, so a
/// new delivery goes out at once without anyone calling [`Gateways::wake`]: staff
/// messages carry their deliveries, SMS authentication steps their texts. A message
/// from the patient queues nothing, and a notification's email wakes the
/// dispatchers itself ([`crate::notifications::Notify::publish`]): waking on those
/// would make every dispatcher search for work once per patient message and once
/// per notification.
async fn wake_on_messages(state: Shared, stop: CancellationToken) {
    let mut events = state.events.subscribe();
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) if !may_queue_deliveries(&event) => {}
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => state.gateways.wake(),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            () = stop.cancelled() => break,
        }
    }
}

/// Whether the change `event` reports may have queued deliveries.
fn may_queue_deliveries(event: &crate::events::Event) -> bool {
    use crate::events::Event;
    match event {
        Event::Message(message) => message.direction != caremsg_entities::Direction::FromPatient,
        Event::SmsStatus(_) => true,
        Event::Notification { .. } => false,
    }
}

/// What `caremsgd plugin inspect` prints about `path`, and whether this daemon can
/// load it.
pub fn inspect(path: &Path) -> (String, bool) {
    match caremsg_plugin_host::inspect(path) {
        Ok(metadata) => {
            let loadable = metadata.is_loadable();
            (metadata.to_string(), loadable)
        }
        Err(error) => (
            format!("file:     {}\nloadable: no: {error}", path.display()),
            false,
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use caremsg_entities::{Channel, Direction, SmsStatus};

    use super::*;
    use crate::events::{Event, MessageEvent, SmsStatusEvent};

    fn message(direction: Direction) -> Event {
        Event::Message(Arc::new(MessageEvent {
            patient_id: "p".into(),
            practice_id: "pr".into(),
            seq: 1,
            direction,
            channel: Channel::Portal,
            body: crate::phi::Phi::new("x".to_owned()),
        }))
    }

    #[test]
    fn dispatchers_wake_for_changes_that_may_queue_deliveries_only() {
        assert!(may_queue_deliveries(&message(Direction::ToPatient)));
        assert!(may_queue_deliveries(&message(Direction::System)));
        assert!(!may_queue_deliveries(&message(Direction::FromPatient)));
        assert!(may_queue_deliveries(&Event::SmsStatus(Arc::new(
            SmsStatusEvent {
                patient_id: "p".into(),
                practice_id: "pr".into(),
                status: SmsStatus::OptedOut,
                reason: None,
            }
        ))));
    }
}
