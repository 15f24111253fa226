//! What every part of the running daemon shares: the database, the writer, the live
//! settings, the clock and the metrics.

use std::sync::Arc;

use arc_swap::ArcSwap;
use caremsg_config::Settings;
use sea_orm::DatabaseConnection;

use tokio_util::sync::CancellationToken;

use crate::actors::Conversations;
use crate::clock::SharedClock;
use crate::events::Events;
use crate::metrics::Metrics;
use crate::writer::Writer;

/// Shared state of the running daemon.
pub struct AppState {
    /// Reads go straight to the pool; writes go through [`AppState::writer`].
    pub db: DatabaseConnection,
    /// The single, group-committed write path.
    pub writer: Writer,
    /// The live settings; a reload swaps them atomically.
    pub settings: Arc<ArcSwap<Settings>>,
    /// "Now", injected.
    pub clock: SharedClock,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Live events for the server-sent event streams.
    pub events: Events,
    /// The conversation actors, one per patient, started on demand.
    pub conversations: Conversations,
    /// The main runtime, where actors send their database work.
    pub runtime: tokio::runtime::Handle,
    /// Cancelled when the daemon stops serving: event streams end with it.
    pub shutdown: CancellationToken,
    /// The gateway plugin instances, their outbox dispatchers and inbound side.
    pub gateways: crate::gateways::Gateways,
    /// High availability: this daemon's role (always active in single mode).
    pub role: crate::ha::RoleWatch,
    /// The acting users of recent staff requests (forgotten on every admin write).
    pub users: crate::access::Users,
}

/// The handle request handlers receive.
pub type Shared = Arc<AppState>;
