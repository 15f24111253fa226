//! High availability: one active daemon per PostgreSQL database, the others standby
//! (`ha.mode = "active-passive"`; issue #17).
//!
//! **Choosing the active daemon.** The [`elector`](Ha::start) holds its own
//! `sqlx::PgConnection`, outside every pool (a pool recycles connections, and a
//! recycled connection silently drops a session lock), with server-side TCP
//! keep-alives so that the session of a crashed host ends inside the lease. A daemon
//! becomes active by taking the session-level advisory lock of the lease key and, in
//! the same transaction, writing the `ha_lease` row: holder, its backend pid, the
//! epoch plus one, and an expiry on PostgreSQL's clock (`now()`). The active daemon
//! renews the expiry every `ha.lease_renew`. A standby polls: the lock free, it takes
//! it; held under an expired lease (a frozen or cut-off holder keeps its TCP session,
//! so PostgreSQL never frees its lock), it terminates the holder's backend and any
//! backend inside a write batch (`FOR SHARE` on the lease row), then takes the lock.
//!
//! **Fencing.** Every batch the writer commits in active-passive mode first reads the
//! lease row `FOR SHARE` ([`Fence::check`]) and fails whole, with
//! [`WriteError::Standby`], unless the stored epoch is its own. A takeover's epoch
//! bump updates that row, so it waits for the batch in flight, and every later batch
//! of the old active fails: a paused-then-resumed old active commits nothing.
//!
//! **Stepping down.** The active daemon steps down when it cannot renew before its
//! lease would expire (measured from the start of its last successful renewal, on
//! the monotonic clock), when the row says another holder or epoch, or when its lock
//! connection fails. The role becomes [`Role::SteppedDown`] at once (every `/v1`
//! request and every write batch fail from then on); `caremsgd run` then stops and
//! re-executes itself (same pid), so nothing of the old active's memory — actors,
//! rate-limit buckets, dispatcher state — survives into the next term; it comes back
//! a standby.
//!
//! **Architecture Invariant:** a write batch commits only while the lease row holds
//! the committing daemon's epoch; an epoch is bumped only by the holder of the
//! lease key's advisory lock.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caremsg_config::{HaMode, Settings};
use sea_orm::sea_query::{Expr, SimpleExpr};
use sea_orm::{ConnectionTrait, DbBackend};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Row};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::writer::WriteError;

/// The lease key: one key, all practices (a later sharding step keys the lock and the
/// epoch by a set of practices).
pub const LEASE_KEY: &str = "all";
/// The advisory lock class (first int4) of the HA lease locks: "care".
const LOCK_CLASS: i32 = 0x6361_7265;
/// The advisory lock class of migrations: "carf".
const MIGRATION_CLASS: i32 = 0x6361_7266;
/// How long a takeover waits for the terminated holder's backend to release its lock.
const RELEASE_WAIT: Duration = Duration::from_secs(3);

/// This daemon's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Waiting for the lease; serves `/healthz`, `/readyz` (503) and nothing else.
    Standby,
    /// Holds the lease with this fencing epoch (0 in single mode).
    Active {
        /// The epoch stored in `ha_lease` when this daemon took it.
        epoch: i64,
    },
    /// Was active and lost the lease: writes nothing more; `run` re-executes.
    SteppedDown,
}

impl Role {
    /// `active` or `standby` (a stepped-down daemon is a standby to its clients).
    pub fn name(self) -> &'static str {
        match self {
            Self::Active { .. } => "active",
            Self::Standby | Self::SteppedDown => "standby",
        }
    }

    /// Whether this daemon may serve and write.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Active { .. })
    }
}

/// The role, as the rest of the daemon watches it.
pub type RoleWatch = watch::Receiver<Role>;

/// The lease settings the elector uses.
#[derive(Debug, Clone)]
struct LeaseOptions {
    url: String,
    holder: String,
    renew: Duration,
    expiry: Duration,
}

/// The high-availability side of a running daemon.
pub struct Ha {
    role: RoleWatch,
    fence: Fence,
    stop: CancellationToken,
    elector: Option<std::thread::JoinHandle<()>>,
}

impl Ha {
    /// In single mode: always active (epoch 0), no fence. In active-passive mode:
    /// starts the elector (as standby) on its own connection.
    pub fn start(settings: &Settings, metrics: Arc<Metrics>) -> Self {
        let stop = CancellationToken::new();
        if settings.ha.mode == HaMode::Single {
            let (_, role) = watch::channel(Role::Active { epoch: 0 });
            metrics.ha_role.set(1);
            return Self {
                role,
                fence: Fence(None),
                stop,
                elector: None,
            };
        }
        let (tx, role) = watch::channel(Role::Standby);
        let options = LeaseOptions {
            url: settings.database_url(),
            holder: holder_name(settings),
            renew: settings.ha.lease_renew,
            expiry: settings.ha.lease_expiry,
        };
        // On a thread and runtime of its own: a main runtime kept busy (a slow
        // handler, a burst of work) must not delay the lease's renewal.
        let token = stop.clone();
        let elector = std::thread::Builder::new()
            .name("caremsg-ha".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(elect(options, tx, metrics, token)),
                    Err(err) => {
                        tracing::error!(error = %err, "HA: the elector's runtime could not start; this daemon stays standby.");
                    }
                }
            })
            .inspect_err(|err| tracing::error!(error = %err, "HA: the elector's thread could not start; this daemon stays standby."))
            .ok();
        Self {
            fence: Fence(Some(Arc::new(role.clone()))),
            role,
            stop,
            elector,
        }
    }

    /// The role, to watch.
    pub fn role(&self) -> RoleWatch {
        self.role.clone()
    }

    /// The fence the writer checks at the start of every batch.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// Releases the lease (its expiry set to now, so a standby takes over at its
    /// next poll) and stops the elector. Call after the writer has flushed.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Some(elector) = self.elector {
            let joined = tokio::task::spawn_blocking(move || elector.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("The HA elector ended abnormally.");
            }
        }
    }
}

/// Waits until `role` is active; returns its epoch.
pub async fn active(role: &mut RoleWatch) -> Option<i64> {
    let role = role.wait_for(|r| r.is_active()).await.ok()?;
    match *role {
        Role::Active { epoch } => Some(epoch),
        _ => None,
    }
}

/// Waits until `role` has stepped down (never, in single mode).
pub async fn stepped_down(mut role: RoleWatch) {
    if role.wait_for(|r| *r == Role::SteppedDown).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The guard every write batch runs first, inside its transaction.
#[derive(Clone)]
pub struct Fence(Option<Arc<RoleWatch>>);

impl Fence {
    /// No fence (single mode, tests, benchmarks).
    pub fn none() -> Self {
        Self(None)
    }

    /// Fails with [`WriteError::Standby`] unless this daemon is active and the lease
    /// row still holds its epoch. Locks the row `FOR SHARE` until the batch ends, so
    /// a takeover's epoch bump waits for the batch.
    pub async fn check(&self, txn: &impl ConnectionTrait) -> Result<(), WriteError> {
        let Some(role) = &self.0 else {
            return Ok(());
        };
        let Role::Active { epoch } = *role.borrow() else {
            return Err(WriteError::Standby);
        };
        let row = txn
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT epoch FROM ha_lease WHERE key = $1 FOR SHARE",
                [LEASE_KEY.into()],
            ))
            .await
            .map_err(|e| WriteError::Database(e.to_string()))?;
        let stored: Option<i64> = row
            .map(|r| r.try_get("", "epoch"))
            .transpose()
            .map_err(|e| WriteError::Database(e.to_string()))?;
        if stored == Some(epoch) {
            Ok(())
        } else {
            tracing::warn!(
                epoch,
                stored,
                "A write batch was fenced off: another daemon holds a newer epoch."
            );
            Err(WriteError::Standby)
        }
    }
}

/// The value a claim stores in `deliveries.claim_epoch`: the lease's epoch (NULL in
/// single mode, where there is no lease row).
pub fn claim_epoch() -> SimpleExpr {
    Expr::cust(format!(
        "(SELECT epoch FROM ha_lease WHERE key = '{LEASE_KEY}')"
    ))
}

/// Rows claimed under an epoch older than the lease's (or in single mode, or before
/// high availability): the rows a start or takeover reconciles.
pub fn claimed_by_an_older_epoch() -> SimpleExpr {
    Expr::cust(format!(
        "(claim_epoch IS NULL OR claim_epoch < \
         COALESCE((SELECT epoch FROM ha_lease WHERE key = '{LEASE_KEY}'), claim_epoch + 1))"
    ))
}

/// Who holds the lease, for operators: host name and process id.
fn holder_name(settings: &Settings) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!(
        "{host}:{}:{}",
        std::process::id(),
        settings.server.listen.port()
    )
}

/// The elector: standby until it takes the lease, then active until it loses it.
async fn elect(
    options: LeaseOptions,
    role: watch::Sender<Role>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    metrics.ha_role.set(0);
    let poll = (options.renew / 5).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut conn: Option<PgConnection> = None;
    let (mut conn, epoch, renewed_at) = loop {
        if conn.is_none() {
            conn = connect(&options).await.ok();
        }
        if let Some(c) = conn.as_mut() {
            let started = Instant::now();
            match acquire(c, &options).await {
                Ok(Some(epoch)) => break (conn.take(), epoch, started),
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "HA: trying for the lease failed; reconnecting.");
                    // A failed attempt may still hold the session lock: drop the session.
                    conn = None;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = stop.cancelled() => return,
        }
    };
    let Some(conn) = conn.as_mut() else { return };
    tracing::info!(epoch, holder = %options.holder, "HA: this daemon is now the active one.");
    metrics.ha_role.set(1);
    metrics.ha_epoch.set(epoch);
    metrics.ha_takeovers.inc();
    role.send_replace(Role::Active { epoch });
    let reason = hold(conn, &options, epoch, renewed_at, &stop).await;
    role.send_replace(Role::SteppedDown);
    metrics.ha_role.set(0);
    metrics.ha_epoch.set(0);
    match reason {
        Ok(()) => {
            // Stopping: the writer has flushed. Let a standby take over at once.
            let release = sqlx::query(
                "UPDATE ha_lease SET expires_at = now() WHERE key = $1 AND epoch = $2 \
                 AND backend_pid = pg_backend_pid()",
            )
            .bind(LEASE_KEY)
            .bind(epoch)
            .execute(&mut *conn);
            if let Err(err) = tokio::time::timeout(options.renew, release).await {
                tracing::warn!(error = %err, "HA: releasing the lease timed out.");
            }
            tracing::info!(epoch, "HA: the lease is released.");
        }
        Err(why) => {
            tracing::error!(
                epoch,
                reason = why,
                "HA: this daemon lost the lease and steps down."
            );
        }
    }
}

/// Renews the lease until `stop` (Ok) or until it is lost (Err with the reason).
async fn hold(
    conn: &mut PgConnection,
    options: &LeaseOptions,
    epoch: i64,
    mut renewed_at: Instant,
    stop: &CancellationToken,
) -> Result<(), &'static str> {
    // Step down before the lease could have expired on PostgreSQL's clock: the
    // expiry counts from a `now()` no earlier than the renewal's start.
    let margin = options.expiry.saturating_sub(options.renew) / 2;
    let safe_for = options.expiry.saturating_sub(margin);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until((renewed_at + options.renew).into()) => {}
            () = stop.cancelled() => return Ok(()),
        }
        let started = Instant::now();
        let deadline = renewed_at + safe_for;
        if started >= deadline {
            return Err("the lease was not renewed in time (the process was paused or slow)");
        }
        let renew = sqlx::query(
            "UPDATE ha_lease SET expires_at = now() + make_interval(secs => $3) \
             WHERE key = $1 AND epoch = $2 AND backend_pid = pg_backend_pid()",
        )
        .bind(LEASE_KEY)
        .bind(epoch)
        .bind(options.expiry.as_secs_f64())
        .execute(&mut *conn);
        match tokio::time::timeout_at(deadline.into(), renew).await {
            Ok(Ok(done)) if done.rows_affected() == 1 => renewed_at = started,
            Ok(Ok(_)) => return Err("another daemon holds the lease"),
            Ok(Err(_)) => return Err("the lock connection failed"),
            Err(_) => return Err("renewing the lease timed out"),
        }
    }
}

/// Opens the elector's own connection, with keep-alives that end a dead peer's
/// session well inside the lease.
async fn connect(options: &LeaseOptions) -> Result<PgConnection, sqlx::Error> {
    let connect = PgConnectOptions::from_str(&options.url)?.application_name("caremsgd-ha");
    let mut conn = PgConnection::connect_with(&connect).await?;
    let (idle, interval) = keepalives(options.expiry);
    sqlx::query(
        "SELECT set_config('tcp_keepalives_idle', $1, false), \
         set_config('tcp_keepalives_interval', $2, false), \
         set_config('tcp_keepalives_count', '3', false)",
    )
    .bind(idle.to_string())
    .bind(interval.to_string())
    .execute(&mut conn)
    .await
    .inspect_err(
        |err| tracing::warn!(error = %err, "HA: the lock connection's keep-alives could not be set."),
    )?;
    Ok(conn)
}

/// Server-side keep-alive idle time and interval (seconds): idle + 3 × interval stays
/// under the lease expiry.
fn keepalives(expiry: Duration) -> (u64, u64) {
    let secs = expiry.as_secs().max(4);
    (secs / 3, (secs / 6).max(1))
}

/// One attempt at the lease: the epoch when taken, None when another daemon holds it.
async fn acquire(
    conn: &mut PgConnection,
    options: &LeaseOptions,
) -> Result<Option<i64>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    // Never wait long behind a stale holder's write batch: terminate and try again.
    sqlx::query("SET LOCAL lock_timeout = '2s'")
        .execute(&mut *tx)
        .await?;
    let mut got = try_lock(&mut tx).await?;
    if !got {
        let lease = sqlx::query(
            "SELECT backend_pid, expires_at < now() AS expired FROM ha_lease WHERE key = $1",
        )
        .bind(LEASE_KEY)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(lease) = lease else {
            return Ok(None);
        };
        if !lease.try_get::<bool, _>("expired")? {
            return Ok(None);
        }
        let pid: i64 = lease.try_get("backend_pid")?;
        tracing::warn!(
            backend_pid = pid,
            "HA: the active daemon's lease expired; ending its sessions and taking over."
        );
        // The holder's lock session, and any session inside a write batch (a batch
        // holds the lease row FOR SHARE until it ends).
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'relation' AND relation = 'ha_lease'::regclass \
             AND mode = 'RowShareLock' AND pid <> pg_backend_pid() \
             UNION ALL SELECT pg_terminate_backend($1::int)",
        )
        .bind(pid)
        .fetch_all(&mut *tx)
        .await?;
        // The backend exits asynchronously: bounded polling of the lock.
        let until = Instant::now() + RELEASE_WAIT;
        while !got && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            got = try_lock(&mut tx).await?;
        }
        if !got {
            return Ok(None);
        }
    }
    let epoch: i64 = sqlx::query_scalar(
        "INSERT INTO ha_lease (key, holder, backend_pid, epoch, expires_at) \
         VALUES ($1, $2, pg_backend_pid(), 1, now() + make_interval(secs => $3)) \
         ON CONFLICT (key) DO UPDATE SET holder = EXCLUDED.holder, \
         backend_pid = EXCLUDED.backend_pid, epoch = ha_lease.epoch + 1, \
         expires_at = EXCLUDED.expires_at \
         RETURNING epoch",
    )
    .bind(LEASE_KEY)
    .bind(&options.holder)
    .bind(options.expiry.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(epoch))
}

async fn try_lock(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(LOCK_CLASS)
        .bind(LEASE_KEY)
        .fetch_one(conn)
        .await
}

/// On PostgreSQL: a session holding the migration lock (taken, waiting if another
/// daemon migrates now); drop it after migrating. None on SQLite.
pub async fn migration_lock(url: &str) -> Result<Option<PgConnection>, sqlx::Error> {
    if !(url.starts_with("postgres:") || url.starts_with("postgresql:")) {
        return Ok(None);
    }
    let connect = PgConnectOptions::from_str(url)?.application_name("caremsgd-migrate");
    let mut conn = PgConnection::connect_with(&connect).await?;
    sqlx::query("SELECT pg_advisory_lock($1, 0)")
        .bind(MIGRATION_CLASS)
        .execute(&mut conn)
        .await?;
    Ok(Some(conn))
}

/// Replaces this process with a fresh `caremsgd` of the same command line (same pid,
/// same environment): how a stepped-down daemon comes back as a standby. Returns only
/// if that failed.
pub fn reexec() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => return err,
    };
    tracing::info!("HA: restarting as a standby.");
    std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .exec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_end_a_dead_session_inside_the_lease() {
        for secs in [3, 5, 15, 60] {
            let (idle, interval) = keepalives(Duration::from_secs(secs));
            assert!(idle >= 1 && interval >= 1);
            assert!(
                idle + 3 * interval <= secs.max(4),
                "{secs}: {idle} + 3 × {interval}"
            );
        }
    }

    #[test]
    fn roles_name_themselves_as_readyz_reports_them() {
        assert_eq!(Role::Active { epoch: 3 }.name(), "active");
        assert_eq!(Role::Standby.name(), "standby");
        assert_eq!(Role::SteppedDown.name(), "standby");
        assert!(!Role::SteppedDown.is_active());
    }
}
