//! caremsgd: the patient messaging daemon, as a library.
//!
//! `main` parses the command line and calls [`run`]; the end-to-end tests call
//! [`start`] and drive the returned [`Running`] daemon directly, so tests exercise the
//! very code path production does.

pub mod access;
pub mod actors;
pub mod api;
pub mod audit;
pub mod bench;
pub mod clock;
pub mod db;
pub mod direct;
pub mod events;
pub mod gateways;
pub mod ha;
pub mod http;
pub mod metrics;
pub mod notifications;
pub mod notify;
pub mod phi;
pub mod phone;
pub mod prune;
pub mod reload;
pub mod rfc3339;
pub mod sms;
pub mod sql;
pub mod sqlite_tuning;
pub mod state;
pub mod timers;
pub mod watchdog;
pub mod writer;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use caremsg_config::Settings;
use sea_orm::DatabaseConnection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::{SharedClock, SystemClock};
use crate::metrics::Metrics;
use crate::reload::{ConfigSource, LogFilterHook, ReloadOutcome, Reloader};
use crate::state::{AppState, Shared};
use crate::writer::{Writer, WriterOptions, WriterTask};

/// How the daemon is started, beyond its settings.
#[derive(Clone)]
pub struct Options {
    /// Where the settings came from, so a reload reads the same sources.
    pub source: ConfigSource,
    /// "Now".
    pub clock: SharedClock,
    /// Applies a new `log.level` on reload.
    pub log_filter: Option<LogFilterHook>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            source: ConfigSource::default(),
            clock: Arc::new(SystemClock),
            log_filter: None,
        }
    }
}

/// The database options the settings describe.
pub fn db_options(settings: &Settings) -> db::DbOptions {
    db::DbOptions {
        url: settings.database_url(),
        max_connections: settings.database.max_connections,
        busy_timeout: settings.database.busy_timeout,
        connect_timeout: settings.database.connect_timeout,
    }
}

/// Opens the database and applies pending migrations (on PostgreSQL under an advisory
/// lock, so daemons starting together never race a migration).
pub async fn open_database(settings: &Settings) -> anyhow::Result<DatabaseConnection> {
    let db = db::connect(&db_options(settings)).await?;
    let lock = ha::migration_lock(&settings.database_url())
        .await
        .context("taking the migration lock")?;
    db::migrate(&db).await?;
    drop(lock);
    Ok(db)
}

/// A started daemon.
pub struct Running {
    // The address actually bound (tests bind port 0).
    addr: SocketAddr,
    // Shared with every handler.
    state: Shared,
    // Applies SIGHUP reloads.
    reloader: Reloader,
    // Stops accepting connections and lets in-flight requests finish.
    http_stop: CancellationToken,
    // Tells the writer to flush and stop, once HTTP is done.
    writer_stop: CancellationToken,
    // The HTTP server task.
    server: JoinHandle<std::io::Result<()>>,
    // The writer task.
    writer: WriterTask,
    // Pings systemd's watchdog while the writer makes progress; refreshes STATUS=.
    watchdog: watchdog::Watchdog,
    // Runs a timer tick on demand (`tick_timers`).
    timers: timers::TimerServiceHandle,
    // The durable timers' wake-up task; stopped before the writer.
    timer_task: JoinHandle<()>,
    // Tells the wake-up task (and the pruner) to stop.
    timer_stop: CancellationToken,
    // High availability: the role, the lease; stopped after the writer.
    ha: ha::Ha,
    // The pruner of operational tables; stopped with the timers, before the writer.
    prune_task: JoinHandle<()>,
}

/// Starts the daemon: database and migrations, the writer, the HTTP server. Returns
/// once it is serving and systemd has been told so.
pub async fn start(settings: Settings, options: Options) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new());
    let mut db = open_database(&settings)
        .await
        .context("opening the database")?;
    let statements = metrics.db_reader_statements.clone();
    db.set_metric_callback(move |_| {
        statements.inc();
    });
    let ha = ha::Ha::start(&settings, metrics.clone());
    let writer_stop = CancellationToken::new();
    let writer_options = WriterOptions {
        max_batch_units: settings.writer.max_batch_units,
        queue_depth: settings.writer.queue_depth,
    };
    let db_options = db_options(&settings);
    let (writer, writer_task) = match db::sqlite_file(&db_options.url)? {
        // SQLite: the writer drives a connection of its own on its thread.
        Some(path) => Writer::start_sqlite(
            writer::SqliteStore::new(&path, db_options.busy_timeout),
            writer_options,
            metrics.clone(),
            writer_stop.clone(),
        ),
        None => {
            let writer_db = db::connect_writer(&db_options)
                .await
                .context("opening the writer's database connection")?;
            Writer::start_fenced(
                writer_db,
                writer_options,
                metrics.clone(),
                writer_stop.clone(),
                ha.fence(),
            )
        }
    }
    .context("starting the writer's thread")?;
    for warning in settings.warnings() {
        tracing::warn!(field = %warning.field, "Configuration: {}.", warning.message);
    }
    let listen = settings.server.listen;
    let settings = Arc::new(ArcSwap::from_pointee(settings));
    // After the writer: the gateways write through it from their first pass.
    let gateways = gateways::Gateways::load(settings.clone(), options.clock.clone())
        .await
        .context("loading the gateway plugins")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let backend = db::backend_name(&db);
    let http_stop = CancellationToken::new();
    let actor_system = actors::ActorSystem::start().context("starting the actor system")?;
    let events = events::Events::new(Some(db.clone()), metrics.events.clone(), 4096);
    let state: Shared = Arc::new_cyclic(|weak| AppState {
        db,
        writer,
        settings: settings.clone(),
        clock: options.clock.clone(),
        metrics: metrics.clone(),
        events,
        conversations: actors::Conversations::new(actor_system, weak.clone()),
        runtime: tokio::runtime::Handle::current(),
        shutdown: http_stop.clone(),
        gateways,
        role: ha.role(),
        users: access::Users::default(),
    });
    // High availability: a standby serves /healthz and /readyz (and 503s) while it
    // waits for the lease; the dispatchers and the timers start on taking it.
    let server = serve(&state, listener, &http_stop);
    // The status line counts gateways and live conversations; the actor system must
    // answer a ping before systemd's watchdog is fed.
    let watchdog = watchdog::Watchdog::start(&state, addr, watchdog_hooks(&state));
    if !state.role.borrow().is_active() {
        tracing::info!(%addr, database = backend, "caremsgd is serving as a standby; it waits for the lease.");
        notify::ready("Standby");
        // The numbering plan's metadata loads on first use (seconds in a debug
        // build): load it now, so the first requests after a takeover do not wait.
        tokio::task::spawn_blocking(|| {
            let _ = phone::parse_any("+12015550100", phonenumber::country::Id::US);
        });
        let epoch = ha::active(&mut ha.role()).await;
        tracing::info!(?epoch, "Active: starting the dispatchers and the timers.");
        state.gateways.empty_rate_buckets();
    }
    state
        .gateways
        .start(&state)
        .await
        .context("starting the gateway dispatchers")?;
    // Durable timers: its first tick, right away, catches up on what came due while
    // the daemon was down. Pages of 1,000, all handed out at once, so a page of due
    // reminders reaches the reminder batcher together.
    let timer_stop = CancellationToken::new();
    let (timer_handle, timer_task) = timers::TimerService::new(
        state.db.clone(),
        state.clock.clone(),
        timers::TimerServiceOptions {
            page_size: 1000,
            concurrency: 2000,
            ..timers::TimerServiceOptions::default()
        },
    )
    .with_failures(state.writer.clone(), state.metrics.clone())
    .with_handler(
        notifications::reminder::KIND,
        notifications::reminder::handler(&state),
    )
    .with_handler(
        caremsg_entities::TimerKind::SmsAuthWindow,
        sms::auth::window_handler(&state),
    )
    .with_handler(
        gateways::consent::FOLLOW_UP,
        gateways::consent::handler(&state),
    )
    .spawn(timer_stop.clone());
    let prune_task = prune::spawn(Arc::downgrade(&state), timer_stop.clone());
    let reloader = Reloader {
        source: options.source,
        settings,
        metrics,
        log_filter: options.log_filter,
        on_apply: vec![gateways_reload_hook(&state), streams_reload_hook(&state)],
    };
    tracing::info!(%addr, database = backend, "caremsgd is serving.");
    notify::ready("Serving");
    Ok(Running {
        addr,
        state,
        reloader,
        http_stop,
        writer_stop,
        server,
        writer: writer_task,
        watchdog,
        timers: timer_handle,
        timer_task,
        timer_stop,
        ha,
        prune_task,
    })
}

/// Serves the API on `listener` until `stop`, under the connection limits of
/// `[server]` (`http::serve`).
fn serve(
    state: &Shared,
    listener: tokio::net::TcpListener,
    stop: &CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    let app = api::router(state.clone());
    tokio::spawn(http::serve(
        listener,
        app,
        state.settings.clone(),
        state.metrics.http_connections_closed.clone(),
        stop.clone(),
    ))
}

/// What the watchdog reports beside the writer: counts for `STATUS=`, and a probe
/// that the actor system still answers (a ping to a conversation actor).
fn watchdog_hooks(state: &Shared) -> watchdog::Hooks {
    let weak = Arc::downgrade(state);
    let gateways: watchdog::StatusPart = Arc::new({
        let weak = weak.clone();
        move || {
            weak.upgrade().map(|s| match s.gateways.names().count() {
                1 => "1 gateway".to_owned(),
                n => format!("{n} gateways"),
            })
        }
    });
    let conversations: watchdog::StatusPart = Arc::new({
        let weak = weak.clone();
        move || {
            weak.upgrade()
                .map(|s| format!("{} conversation actors live", s.conversations.live()))
        }
    });
    let actors = watchdog::Probe::new("conversation actors", move || {
        let weak = weak.clone();
        Box::pin(async move {
            let Some(state) = weak.upgrade() else {
                return watchdog::Health::Degraded("stopping");
            };
            match state
                .conversations
                .send("caremsg-watchdog-probe", actors::conversation::Ping)
                .await
            {
                Ok(()) => watchdog::Health::Ok,
                Err(_) => watchdog::Health::Degraded("the actor system does not answer"),
            }
        })
    });
    watchdog::Hooks {
        status: vec![gateways, conversations],
        probes: vec![actors],
    }
}

impl Running {
    /// The address the HTTP server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state (tests read the database through it).
    pub fn state(&self) -> &Shared {
        &self.state
    }

    /// Runs a tick of the durable timers at the clock's "now" and waits for it: what
    /// the periodic tick does, on demand. Tests move a `ManualClock` and call this
    /// rather than wait for the next period; when it returns, every timer due at that
    /// "now" has fired (or failed, and stays due).
    pub async fn tick_timers(&self) -> Result<timers::Tick, timers::TimerError> {
        self.timers.tick().await
    }

    /// Polls every gateway plugin's health now and waits for the answers: what the
    /// periodic poll does every `health_interval`, on demand.
    pub async fn poll_gateway_health(&self) {
        self.state.gateways.poll_health(&self.state).await;
    }

    /// Reloads the configuration, as SIGHUP does.
    pub fn reload(&self) -> ReloadOutcome {
        self.reloader.reload()
    }

    /// Stops gracefully: no new connections, in-flight requests finish (for at most
    /// `server.shutdown_timeout`), then the writer commits everything it accepted.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.watchdog.stop().await;
        notify::stopping();
        tracing::info!("caremsgd is stopping.");
        self.http_stop.cancel();
        let grace = self.state.settings.load().server.shutdown_timeout;
        let mut server = self.server;
        match tokio::time::timeout(grace, &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => {
                tracing::error!(error = %err, "The HTTP server failed while stopping.")
            }
            Ok(Err(err)) => tracing::error!(error = %err, "The HTTP server task ended abnormally."),
            Err(_) => {
                tracing::warn!(
                    grace_ms = grace.as_millis() as u64,
                    "Requests were still running at the end of the grace period; they were cut off."
                );
                server.abort();
            }
        }
        // Timer handlers write through the writer (and may use actors): stop them first.
        self.timer_stop.cancel();
        if let Err(err) = self.timer_task.await {
            tracing::error!(error = %err, "The timer service task ended abnormally.");
        }
        if let Err(err) = self.prune_task.await {
            tracing::error!(error = %err, "The pruner task ended abnormally.");
        }
        // The gateways record the pass in flight through the writer, and texts a
        // plugin emitted may still go to a patient's actor: before both.
        self.state.gateways.shutdown(grace).await;
        // Requests are done; no one sends to an actor any more.
        self.state.conversations.stop();
        self.writer_stop.cancel();
        self.writer.join().await;
        // After the writer's last batch: the lease is released for a standby.
        self.ha.stop().await;
        let db = self.state.db.clone();
        drop(self.state);
        if let Err(err) = db.close().await {
            tracing::warn!(error = %err, "The database pool did not close cleanly.");
        }
        tracing::info!("caremsgd has stopped.");
        Ok(())
    }
}

/// Rebuilds the gateways' changed rate limiters and allow-lists on reload.
fn gateways_reload_hook(state: &Shared) -> reload::ApplyHook {
    let state = Arc::downgrade(state);
    Arc::new(move |old: &Settings, new: &Settings| {
        if let Some(state) = state.upgrade() {
            state.gateways.reload(old, new);
        }
    })
}

/// Ends the event streams whose token a reload no longer lists (with its scope and
/// practice).
fn streams_reload_hook(state: &Shared) -> reload::ApplyHook {
    let state = Arc::downgrade(state);
    Arc::new(move |_old: &Settings, new: &Settings| {
        if let Some(state) = state.upgrade() {
            state.events.revalidate(&new.clients);
        }
    })
}

/// Runs the daemon until `shutdown` completes; SIGHUP reloads the configuration.
pub async fn run(
    settings: Settings,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Before start: systemd may send the reload's SIGHUP as soon as READY=1 is out.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    tokio::pin!(shutdown);
    // A standby waits in `start` for the lease; SIGTERM must still stop it.
    let running = tokio::select! {
        running = start(settings, options) => running?,
        () = &mut shutdown => {
            tracing::info!("caremsgd stopped before it became active.");
            return Ok(());
        }
    };
    // One line on stdout for whoever started it by hand (journald keeps it too).
    println!("caremsgd: listening on http://{}", running.local_addr());
    let stepped_down = ha::stepped_down(running.state.role.clone());
    tokio::pin!(stepped_down);
    let mut lost = false;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = hangup.recv() => { running.reload(); }
            () = &mut stepped_down => { lost = true; break }
        }
    }
    running.shutdown().await?;
    if lost {
        // Nothing of the old term (actors, rate-limit buckets, dispatchers) may
        // survive into the next: come back as a fresh standby, same pid.
        return Err(ha::reexec()).context("restarting as a standby after losing the lease");
    }
    Ok(())
}
