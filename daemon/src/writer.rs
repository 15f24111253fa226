//! The group-commit writer: the single path by which caremsg changes its database.
//!
//! Callers describe a change as a [`WriteUnit`] (inserts from active models, updates
//! and deletes as statements) and [`Writer::write`] it. One task gathers the units
//! that arrive together into one database transaction and answers every caller only
//! after that transaction has committed.
//!
//! Committing is cheap; statements are not (about 0.15 ms each through sqlx on
//! SQLite). So the batch's inserts are first merged across units into multi-row
//! `INSERT` statements, in one transaction. If anything in that merged attempt
//! fails, it is rolled back and the batch is replayed unit by unit in a new
//! transaction, each unit in its own savepoint: a failing unit is rolled back alone
//! and its caller gets its own error while its batch-mates commit.
//!
//! **Storage faults.** A batch starts only on a connection verified to be outside any
//! transaction; after any failed batch the connection is discarded and replaced, so
//! a `COMMIT` or `ROLLBACK` that failed half-way (SQLite rolling back on its own after
//! `SQLITE_FULL`, a killed PostgreSQL backend) can never leave a later batch inside a
//! stale transaction where its "commit" would only release a savepoint. Callers of a
//! failed batch get [`WriteError::Unavailable`], or [`WriteError::OutcomeUnknown`]
//! when the `COMMIT` itself broke off. While the last attempt failed the writer is
//! [`StorageHealth::Failing`]: it retries a probe write every [`PROBE_RETRY`] and
//! before each batch, and refuses batches untried until one commits.
//!
//! **Architecture Invariant:** a caller that got `Ok(())` from [`Writer::write`] can
//! read its rows back from any other connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use sea_orm::sea_query::{
    Alias, DeleteStatement, Expr, InsertStatement, OnConflict, Query, UpdateStatement,
};
use sea_orm::{
    ActiveModelTrait, ActiveValue, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr,
    EntityName, EntityTrait, IdenStatic, Iterable, SqlErr, TransactionTrait, Value,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::ha::Fence;
use crate::metrics::Metrics;

mod sqlite;

pub use sqlite::SqliteStore;

/// The name of the writer's thread (benchmarks tell its CPU from the rest's).
pub const THREAD_NAME: &str = "caremsg-writer";

/// Most bind parameters one merged statement may carry (SQLite allows 32,766,
/// PostgreSQL 65,535).
const MAX_PARAMS_PER_STATEMENT: usize = 30_000;
/// Most rows one merged statement may carry.
const MAX_ROWS_PER_STATEMENT: usize = 1_000;

/// Where a batch's statements run: a sea-orm transaction (PostgreSQL, and SQLite in
/// unit tests of the writer over an in-memory database), or the writer's own SQLite
/// connection ([`SqliteStore`]).
trait Exec {
    fn backend(&self) -> sea_orm::DbBackend;

    /// Runs `statement`; the rows it changed.
    async fn run(&self, statement: sea_orm::Statement) -> Result<u64, WriteError>;

    /// Builds and runs a sea-query statement.
    async fn build_and_run(
        &self,
        statement: &impl sea_orm::StatementBuilder,
    ) -> Result<u64, WriteError> {
        self.run(statement.build(&self.backend())).await
    }
}

impl Exec for sea_orm::DatabaseTransaction {
    fn backend(&self) -> sea_orm::DbBackend {
        self.get_database_backend()
    }

    async fn run(&self, statement: sea_orm::Statement) -> Result<u64, WriteError> {
        self.execute_raw(statement)
            .await
            .map(|result| result.rows_affected())
            .map_err(|e| WriteError::from_db(&e))
    }
}

/// Why a write unit was not committed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WriteError {
    /// A unique key or primary key already holds this value.
    #[error("a unique constraint was violated")]
    Conflict(String),
    /// A referenced row does not exist.
    #[error("a foreign key constraint was violated")]
    MissingReference(String),
    /// A statement of the unit touched a different number of rows than it required.
    #[error("precondition failed: {0}")]
    Precondition(&'static str),
    /// The database failed; the unit was not committed.
    #[error("database error: {0}")]
    Database(String),
    /// The storage cannot take writes now (a full disk, an I/O error, a lock held
    /// past the busy timeout, a lost connection): the unit was not committed, and a
    /// retry may succeed once the storage recovers.
    #[error("the database cannot store writes now: {0}")]
    Unavailable(String),
    /// The batch's `COMMIT` broke off (the connection was lost during it): the unit
    /// may or may not be stored. Retry with the same idempotency key, or read back.
    #[error("the commit's outcome is unknown: {0}")]
    OutcomeUnknown(String),
    /// The writer is shut down.
    #[error("the writer is shut down")]
    Closed,
    /// This daemon is not the active one (high availability): the batch was fenced
    /// off and nothing of it was committed.
    #[error("this daemon is standby; another daemon holds the lease")]
    Standby,
}

impl WriteError {
    fn from_db(err: &DbErr) -> Self {
        match err.sql_err() {
            Some(SqlErr::UniqueConstraintViolation(what)) => Self::Conflict(what),
            Some(SqlErr::ForeignKeyConstraintViolation(what)) => Self::MissingReference(what),
            _ if crate::db::fault(err).is_some() => Self::Unavailable(err.to_string()),
            _ => Self::Database(err.to_string()),
        }
    }

    /// Whether the storage failed (rather than the unit): the whole batch is lost.
    pub fn is_storage(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::OutcomeUnknown(_))
    }

    /// The error of a batch whose `BEGIN`, statement or `ROLLBACK` failed: nothing of
    /// it was committed.
    fn not_committed(err: &DbErr) -> Self {
        match Self::from_db(err) {
            storage @ Self::Unavailable(_) => storage,
            _ => Self::Unavailable(err.to_string()),
        }
    }

    /// The error of a batch whose `COMMIT` failed: unknown if it broke off half-way,
    /// else not committed.
    fn commit_failed(err: &DbErr) -> Self {
        match crate::db::fault(err) {
            Some(crate::db::Fault::Interrupted) => Self::OutcomeUnknown(err.to_string()),
            _ => Self::not_committed(err),
        }
    }
}

/// Whether the writer can commit, as its last attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageHealth {
    /// The last batch (or probe write) committed.
    Ok,
    /// The last batch or probe write failed; the reason (no PHI: a database error
    /// message). Writes are answered [`WriteError::Unavailable`] without being tried
    /// until a probe write commits.
    Failing(String),
}

/// How many rows a statement must touch for its unit to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Any number, including none.
    Any,
    /// Exactly this many.
    Exactly(u64),
    /// At least one.
    Some,
}

impl Expect {
    fn holds(self, rows: u64) -> bool {
        match self {
            Self::Any => true,
            Self::Exactly(n) => rows == n,
            Self::Some => rows > 0,
        }
    }
}

/// What an insert does when its key already exists.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Conflict {
    /// Fail the unit.
    Fail,
    /// Update the columns `update` of the existing row with the inserted values (an
    /// upsert keyed by the columns `key`); none: keep the row as it is. With
    /// `forward`, only when the inserted value of that column is greater than the
    /// row's (a value that only moves forward).
    Update {
        key: Vec<&'static str>,
        update: Vec<&'static str>,
        forward: Option<&'static str>,
    },
    /// Keep the existing row (an idempotent insert keyed by these columns).
    Ignore(Vec<&'static str>),
}

/// One row to insert, taken from an active model.
#[derive(Debug, Clone)]
struct InsertRow {
    table: &'static str,
    columns: Vec<&'static str>,
    values: Vec<Value>,
    conflict: Conflict,
}

/// A statement that cannot be merged with others.
#[derive(Debug, Clone)]
enum Statement {
    Update(UpdateStatement),
    Delete(DeleteStatement),
    Insert(InsertStatement),
}

/// A compare-and-set of one row (`UPDATE table SET … WHERE key = ? AND guard = ?`,
/// which must touch exactly that row); the leading ones of a batch's units are
/// merged into one `UPDATE … CASE` per table and shape.
#[derive(Debug, Clone)]
struct Advance {
    table: &'static str,
    key: (&'static str, Value),
    guard: (&'static str, Value),
    set: Vec<(&'static str, Value)>,
    what: &'static str,
}

#[derive(Debug, Clone)]
enum Op {
    Insert(InsertRow),
    Advance(Advance),
    Exec {
        statement: Box<Statement>,
        expect: Expect,
        what: &'static str,
    },
}

/// A change that commits whole or not at all.
#[derive(Debug, Clone, Default)]
pub struct WriteUnit {
    ops: Vec<Op>,
}

impl From<UpdateStatement> for Statement {
    fn from(s: UpdateStatement) -> Self {
        Self::Update(s)
    }
}
impl From<DeleteStatement> for Statement {
    fn from(s: DeleteStatement) -> Self {
        Self::Delete(s)
    }
}
impl From<InsertStatement> for Statement {
    fn from(s: InsertStatement) -> Self {
        Self::Insert(s)
    }
}

impl WriteUnit {
    /// An empty unit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the unit changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Inserts the set columns of `model`; a duplicate key fails the unit.
    pub fn insert<A: ActiveModelTrait>(self, model: A) -> Self {
        self.push_row(model, |_| Conflict::Fail)
    }

    /// Inserts `model`, or updates the existing row with the same `key` columns (every
    /// column `model` sets).
    pub fn upsert<A: ActiveModelTrait>(
        self,
        model: A,
        key: &[<A::Entity as EntityTrait>::Column],
    ) -> Self {
        self.upsert_with(model, key, None)
    }

    /// [`WriteUnit::upsert`], except that the existing row is updated only when the
    /// inserted `forward` column is greater than the row's: a value that only moves
    /// forward (a read marker) stays where it is against a stale or repeated write,
    /// whatever the caller believed the row held.
    pub fn upsert_forward<A: ActiveModelTrait>(
        self,
        model: A,
        key: &[<A::Entity as EntityTrait>::Column],
        forward: <A::Entity as EntityTrait>::Column,
    ) -> Self {
        self.upsert_with(model, key, Some(forward.as_str()))
    }

    /// An upsert keyed by `key` that updates every other column `model` sets
    /// (only forward in `forward`, when named).
    fn upsert_with<A: ActiveModelTrait>(
        self,
        model: A,
        key: &[<A::Entity as EntityTrait>::Column],
        forward: Option<&'static str>,
    ) -> Self {
        let key: Vec<&'static str> = key.iter().map(|c| c.as_str()).collect();
        self.push_row(model, |columns| Conflict::Update {
            update: columns
                .iter()
                .filter(|c| !key.contains(c))
                .copied()
                .collect(),
            key,
            forward,
        })
    }

    /// Inserts `model`, or updates only the columns `update` of the existing row with
    /// the same `key` columns: the row's other columns keep what they hold, whoever
    /// wrote them since the caller read it. `model` must still set every `NOT NULL`
    /// column (PostgreSQL checks the proposed row before it sees the conflict); a
    /// column of `update` that `model` leaves unset is not updated.
    pub fn upsert_columns<A: ActiveModelTrait>(
        self,
        model: A,
        key: &[<A::Entity as EntityTrait>::Column],
        update: &[<A::Entity as EntityTrait>::Column],
    ) -> Self {
        let key: Vec<&'static str> = key.iter().map(|c| c.as_str()).collect();
        let update: Vec<&'static str> = update
            .iter()
            .map(|c| c.as_str())
            .filter(|c| !key.contains(c))
            .collect();
        self.push_row(model, |columns| Conflict::Update {
            update: update.into_iter().filter(|c| columns.contains(c)).collect(),
            key,
            forward: None,
        })
    }

    /// Inserts `model` unless a row with the same `key` columns exists.
    pub fn insert_or_ignore<A: ActiveModelTrait>(
        self,
        model: A,
        key: &[<A::Entity as EntityTrait>::Column],
    ) -> Self {
        let key = key.iter().map(|c| c.as_str()).collect();
        self.push_row(model, |_| Conflict::Ignore(key))
    }

    /// Runs `statement`; the unit fails unless the rows it touched meet `expect`.
    /// `what` names the precondition in the error.
    pub fn exec(
        mut self,
        statement: impl Into<StatementArg>,
        expect: Expect,
        what: &'static str,
    ) -> Self {
        self.ops.push(Op::Exec {
            statement: Box::new(statement.into().0),
            expect,
            what,
        });
        self
    }

    /// Sets the columns `set` of the row whose `key` column holds the key's value, if
    /// its `guard` column still holds the guard's value; the unit fails with
    /// [`WriteError::Precondition`]`(what)` unless exactly that row changed. Put it
    /// among a unit's leading inserts: there it is merged with the batch's other
    /// compare-and-sets of the same table and shape (and runs after the merged
    /// inserts).
    pub fn compare_and_set<C: ColumnTrait>(
        mut self,
        key: (C, Value),
        guard: (C, Value),
        set: Vec<(C, Value)>,
        what: &'static str,
    ) -> Self {
        self.ops.push(Op::Advance(Advance {
            table: C::EntityName::default().table_name(),
            key: (key.0.as_str(), key.1),
            guard: (guard.0.as_str(), guard.1),
            set: set.into_iter().map(|(c, v)| (c.as_str(), v)).collect(),
            what,
        }));
        self
    }

    /// Appends every operation of `other`.
    pub fn merge(mut self, other: WriteUnit) -> Self {
        self.ops.extend(other.ops);
        self
    }

    /// Adds the insert of `model`'s set columns; `conflict` is given those columns.
    fn push_row<A: ActiveModelTrait>(
        mut self,
        model: A,
        conflict: impl FnOnce(&[&'static str]) -> Conflict,
    ) -> Self {
        let mut columns = Vec::new();
        let mut values = Vec::new();
        for column in <A::Entity as EntityTrait>::Column::iter() {
            match model.get(column) {
                ActiveValue::Set(v) | ActiveValue::Unchanged(v) => {
                    columns.push(column.as_str());
                    values.push(v);
                }
                ActiveValue::NotSet => {}
            }
        }
        let table = A::Entity::default().table_name();
        let conflict = conflict(&columns);
        self.ops.push(Op::Insert(InsertRow {
            table,
            columns,
            values,
            conflict,
        }));
        self
    }
}

/// A statement accepted by [`WriteUnit::exec`] (update, delete or insert).
#[derive(Debug)]
pub struct StatementArg(Statement);

impl<T: Into<Statement>> From<T> for StatementArg {
    fn from(s: T) -> Self {
        Self(s.into())
    }
}

struct Job {
    unit: WriteUnit,
    reply: oneshot::Sender<Result<(), WriteError>>,
}

/// Handle to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    // Where units wait for the next batch; bounded so that overload pushes back.
    jobs: mpsc::Sender<Job>,
    // While true, the writer takes no new batch (operators' and tests' brake: lets
    // units queue up, and lets a watchdog test see a writer that makes no progress).
    paused: Arc<watch::Sender<bool>>,
    // Units handed to `write` and not yet answered (for `queued`).
    waiting: Arc<AtomicUsize>,
    // Whether the last commit succeeded (see `storage`).
    health: watch::Receiver<StorageHealth>,
}

/// The writer task; await [`WriterTask::join`] after shutdown to know it has flushed.
pub struct WriterTask {
    // Answered when the writer's thread has run the task to its end; dropped
    // unanswered if the task panicked.
    done: oneshot::Receiver<()>,
}

impl WriterTask {
    /// Waits until every accepted unit is committed (or failed) and the task ended.
    pub async fn join(self) {
        if self.done.await.is_err() {
            tracing::error!("The writer task ended abnormally.");
        }
    }
}

/// Settings of the writer.
#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    /// Most units in one transaction.
    pub max_batch_units: usize,
    /// Most units waiting for a batch before callers wait.
    pub queue_depth: usize,
}

impl Writer {
    /// Starts the writer task on `db`, on a thread of its own (the only error: that
    /// thread could not be created). It stops once `stop` is cancelled and every unit
    /// already accepted is committed. Call it from within the Tokio runtime.
    pub fn start(
        db: DatabaseConnection,
        options: WriterOptions,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> std::io::Result<(Writer, WriterTask)> {
        Self::start_fenced(db, options, metrics, stop, Fence::none())
    }

    /// [`Writer::start`], with `fence` checked at the start of every batch
    /// transaction (high availability, [`crate::ha`]).
    pub fn start_fenced(
        db: DatabaseConnection,
        options: WriterOptions,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        fence: Fence,
    ) -> std::io::Result<(Writer, WriterTask)> {
        Self::spawn(Store::Orm(db), options, metrics, stop, fence)
    }

    /// [`Writer::start`] on the writer's own SQLite connection to `store`, driven by
    /// the writer's thread ([`SqliteStore`]): the daemon's writer on SQLite.
    pub fn start_sqlite(
        store: SqliteStore,
        options: WriterOptions,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> std::io::Result<(Writer, WriterTask)> {
        Self::spawn(Store::Sqlite(store), options, metrics, stop, Fence::none())
    }

    fn spawn(
        store: Store,
        options: WriterOptions,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        fence: Fence,
    ) -> std::io::Result<(Writer, WriterTask)> {
        let (jobs, rx) = mpsc::channel(options.queue_depth.max(1));
        let max = options.max_batch_units.max(1);
        let (paused, gate) = watch::channel(false);
        let (finished, done) = oneshot::channel();
        let (health_tx, health) = watch::channel(StorageHealth::Ok);
        let batcher = Batcher {
            store,
            metrics,
            health: health_tx,
            fence,
        };
        // The writer's task runs on a thread of its own, not among the runtime's
        // workers: it is the one serial stage every write passes through, and on a
        // busy worker each of a batch's statements waited behind the HTTP and actor
        // tasks queued there before the next could be sent. Its I/O and timers
        // stay with the runtime (`Handle::block_on`).
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                // Made on this thread: the SQLite connection it borrows stays here.
                runtime.block_on(run(batcher, rx, max, stop, gate));
                let _ = finished.send(());
            })?;
        Ok((
            Writer {
                jobs,
                paused: Arc::new(paused),
                waiting: Arc::default(),
                health,
            },
            WriterTask { done },
        ))
    }

    /// Stops taking new batches until [`Writer::resume`]; the batch in progress finishes.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Takes batches again.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Units in the writer's queue or batch whose [`Writer::write`] callers have not
    /// been answered yet (a unit still waiting for room in a full queue is not counted).
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Whether the writer's last batch or probe write committed. While it is
    /// [`StorageHealth::Failing`] the writer retries a probe write every
    /// [`PROBE_RETRY`] and answers writes [`WriteError::Unavailable`] until one commits.
    pub fn storage(&self) -> StorageHealth {
        self.health.borrow().clone()
    }

    /// Returns once the writer can commit again ([`StorageHealth::Ok`]), at once if
    /// it can now (or if the writer has stopped).
    pub async fn storage_ok(&self) {
        let mut health = self.health.clone();
        let _ = health.wait_for(|health| *health == StorageHealth::Ok).await;
    }

    /// Commits `unit` in the next batch; returns after the commit.
    pub async fn write(&self, unit: WriteUnit) -> Result<(), WriteError> {
        if unit.is_empty() {
            return Ok(());
        }
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { unit, reply })
            .await
            .map_err(|_| WriteError::Closed)?;
        // Counted once in the queue, so that a count of n means n units the writer
        // can take (its next batch takes every unit waiting).
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        answer.await.map_err(|_| WriteError::Closed)?
    }

    /// Sends an empty unit through the queue and the batch loop, as any write travels,
    /// and returns once the batch it joined has committed (`Ok`) or failed. The
    /// watchdog pings systemd only after a heartbeat came back, so a writer that stops
    /// taking batches, or hangs in a commit, stops the pings. Not counted by
    /// [`Writer::queued`] or in the writer's unit and batch metrics.
    pub async fn heartbeat(&self) -> Result<(), WriteError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                unit: WriteUnit::new(),
                reply,
            })
            .await
            .map_err(|_| WriteError::Closed)?;
        answer.await.map_err(|_| WriteError::Closed)?
    }
}

/// The writer's database: a sea-orm connection of its own, or (SQLite in the daemon)
/// a connection the writer's thread drives itself.
enum Store {
    Orm(DatabaseConnection),
    Sqlite(SqliteStore),
}

/// How often a writer that cannot commit tries a probe write while no batch comes.
pub const PROBE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// What the batch loop commits with, and where it reports.
struct Batcher {
    store: Store,
    metrics: Arc<Metrics>,
    health: watch::Sender<StorageHealth>,
    fence: Fence,
}

async fn run(
    mut batcher: Batcher,
    mut rx: mpsc::Receiver<Job>,
    max: usize,
    stop: CancellationToken,
    mut gate: watch::Receiver<bool>,
) {
    // First a probe write, so that a daemon started on a full disk says so at once.
    batcher.probe().await;
    let mut batch: Vec<Job> = Vec::with_capacity(max);
    loop {
        let failing = batcher.failing();
        let first = tokio::select! {
            biased;
            job = rx.recv() => job,
            () = stop.cancelled() => { rx.close(); rx.recv().await }
            () = tokio::time::sleep(PROBE_RETRY), if failing => {
                batcher.probe().await;
                continue;
            }
        };
        let Some(first) = first else { break };
        if gate.wait_for(|paused| !paused).await.is_err() {
            tracing::warn!("The writer's pause switch is gone; the writer goes on unpaused.");
        }
        batch.push(first);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        // Watchdog heartbeats are empty units; they are not writes.
        let units = batch.iter().filter(|job| !job.unit.is_empty()).count();
        let results = batcher.commit(&batch, units).await;
        // Counted before anyone is answered: a caller that has its answer sees its
        // batch in the metrics.
        if units > 0 {
            batcher.metrics.writer_batch(units, started.elapsed());
        }
        for (job, result) in batch.drain(..).zip(results) {
            // A caller that went away no longer needs its answer; its unit is committed.
            let _ = job.reply.send(result);
        }
    }
    tracing::info!("The writer has flushed every accepted write and stopped.");
}

impl Batcher {
    fn failing(&self) -> bool {
        matches!(*self.health.borrow(), StorageHealth::Failing(_))
    }

    /// Records that the storage cannot commit, logging the change once.
    fn fail(&self, error: &WriteError) {
        let reason = error.to_string();
        let was_ok = !self.failing();
        self.health.send_replace(StorageHealth::Failing(reason));
        if was_ok {
            tracing::error!(%error, "The writer cannot commit: writes are refused (503 storage_unavailable) and a probe write is retried until one commits.");
        }
    }

    /// Records that a commit succeeded, logging the recovery once.
    fn recovered(&self) {
        if self.failing() {
            self.health.send_replace(StorageHealth::Ok);
            tracing::warn!("The writer commits again: writes are accepted.");
        }
    }

    /// Commits one batch of which `units` are not empty: the answer of every job in
    /// it, in order. While the storage is failing, a probe write goes first, and if
    /// it fails too the batch is refused without being tried.
    async fn commit(&mut self, batch: &[Job], units: usize) -> Vec<Result<(), WriteError>> {
        if self.failing() && !self.probe().await {
            let error = match &*self.health.borrow() {
                StorageHealth::Failing(reason) => WriteError::Unavailable(reason.clone()),
                StorageHealth::Ok => WriteError::Unavailable("storage failing".into()),
            };
            return vec![Err(error); batch.len()];
        }
        let result = match self.ready().await {
            Ok(()) => match &mut self.store {
                Store::Orm(db) => try_commit(db, &self.fence, batch).await,
                Store::Sqlite(store) => {
                    let result = match store.conn() {
                        Ok(conn) => try_commit_sqlite(&sqlite::SqliteTxn(conn), batch).await,
                        Err(err) => Err(err),
                    };
                    if result.is_ok() {
                        store.committed();
                    }
                    result
                }
            },
            Err(err) => Err(err),
        };
        match result {
            Ok(results) => {
                if units > 0 {
                    self.recovered();
                }
                results
            }
            Err(error) => {
                tracing::error!(%error, units = batch.len(), "A write batch failed to commit.");
                self.after_failure(&error).await;
                vec![Err(error); batch.len()]
            }
        }
    }

    /// The invariant's precondition: the connection the batch will use is outside
    /// any transaction. One that is not (a failed `COMMIT` or `ROLLBACK` left it
    /// inside) is discarded and replaced, and the replacement checked.
    async fn ready(&mut self) -> Result<(), WriteError> {
        for _ in 0..2 {
            let outside = match &mut self.store {
                Store::Orm(db) => crate::db::outside_transaction(db)
                    .await
                    .map_err(|err| WriteError::not_committed(&err))?,
                Store::Sqlite(store) => store.outside_transaction()?,
            };
            if outside {
                return Ok(());
            }
            tracing::error!(
                "The writer's connection is inside a transaction before a batch; it is discarded and replaced."
            );
            self.discard().await;
        }
        Err(WriteError::Unavailable(
            "the writer's connection stays inside a transaction".into(),
        ))
    }

    /// After a failed batch: the connection is discarded (whatever transaction or
    /// savepoints the failure left open end with it) and the storage marked failing.
    async fn after_failure(&mut self, error: &WriteError) {
        self.discard().await;
        self.fail(error);
    }

    /// Closes the connection; the next batch or probe opens a new one.
    async fn discard(&mut self) {
        match &mut self.store {
            Store::Orm(db) => crate::db::discard_writer_connection(db).await,
            Store::Sqlite(store) => store.discard(),
        }
    }

    /// One probe write in a transaction of its own: a real write that changes
    /// nothing ([`probe_write`]). Returns whether it committed, and records that.
    async fn probe(&mut self) -> bool {
        let result = match self.ready().await {
            Ok(()) => match &mut self.store {
                Store::Orm(db) => probe_write(db).await,
                Store::Sqlite(store) => store.conn().and_then(sqlite::probe_write),
            },
            Err(err) => Err(err),
        };
        match result {
            Ok(()) => {
                self.recovered();
                true
            }
            Err(error) => {
                self.after_failure(&error).await;
                false
            }
        }
    }
}

/// A write that must reach the disk to commit and changes nothing: on SQLite the
/// database header's `user_version` set to the value it has (its page goes to the
/// WAL at `COMMIT`), on PostgreSQL a transaction id assigned (`txid_current()`, so
/// the `COMMIT` writes and flushes a WAL record).
async fn probe_write(db: &DatabaseConnection) -> Result<(), WriteError> {
    use sea_orm::DbBackend;
    let backend = db.get_database_backend();
    let txn = db
        .begin()
        .await
        .map_err(|e| WriteError::not_committed(&e))?;
    let wrote = match backend {
        DbBackend::Sqlite => {
            let version: Option<i64> = txn
                .query_one_raw(sea_orm::Statement::from_string(
                    backend,
                    "PRAGMA user_version",
                ))
                .await
                .and_then(|row| row.map(|r| r.try_get_by_index(0)).transpose())
                .map_err(|e| WriteError::not_committed(&e))?;
            txn.execute_unprepared(&format!("PRAGMA user_version = {}", version.unwrap_or(0)))
                .await
        }
        _ => txn.execute_unprepared("SELECT txid_current()").await,
    };
    if let Err(err) = wrote {
        let error = WriteError::not_committed(&err);
        txn.rollback()
            .await
            .map_err(|e| WriteError::not_committed(&e))?;
        return Err(error);
    }
    txn.commit()
        .await
        .map_err(|e| WriteError::commit_failed(&e))
}

async fn try_commit(
    db: &DatabaseConnection,
    fence: &Fence,
    batch: &[Job],
) -> Result<Vec<Result<(), WriteError>>, WriteError> {
    let begin = |e: DbErr| WriteError::not_committed(&e);
    // First, optimistically, the whole batch merged in one transaction: no savepoint
    // statements on the common path, where nothing fails.
    let txn = db.begin().await.map_err(begin)?;
    if let Err(fenced) = fenced(&txn, fence, batch).await {
        txn.rollback().await.map_err(begin)?;
        return Ok(fenced);
    }
    match run_merged(&txn, batch).await {
        Ok(()) => {
            txn.commit()
                .await
                .map_err(|e| WriteError::commit_failed(&e))?;
            return Ok(vec![Ok(()); batch.len()]);
        }
        // The storage failed (SQLite may have rolled the transaction back on its
        // own): the batch fails whole, no replay.
        Err(err) if err.is_storage() => return Err(err),
        Err(err) => {
            tracing::debug!(error = %err, units = batch.len(), "A merged batch failed; replaying it unit by unit.")
        }
    }
    txn.rollback().await.map_err(begin)?;
    // Something failed: replay unit by unit, each in its own savepoint, so only the
    // failing units are rolled back.
    let txn = db.begin().await.map_err(begin)?;
    if let Err(fenced) = fenced(&txn, fence, batch).await {
        txn.rollback().await.map_err(begin)?;
        return Ok(fenced);
    }
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let savepoint = txn.begin().await.map_err(begin)?;
        match run_unit(&savepoint, &job.unit).await {
            Ok(()) => {
                savepoint.commit().await.map_err(begin)?;
                results.push(Ok(()));
            }
            Err(err) if err.is_storage() => return Err(err),
            Err(err) => {
                savepoint.rollback().await.map_err(begin)?;
                results.push(Err(err));
            }
        }
    }
    txn.commit()
        .await
        .map_err(|e| WriteError::commit_failed(&e))?;
    Ok(results)
}

/// [`try_commit`] on the writer's own SQLite connection (no fence: high availability
/// needs PostgreSQL). A storage error returns with the transaction open; the caller
/// discards the connection, which rolls it back.
async fn try_commit_sqlite(
    txn: &sqlite::SqliteTxn<'_>,
    batch: &[Job],
) -> Result<Vec<Result<(), WriteError>>, WriteError> {
    txn.control("BEGIN")?;
    match run_merged(txn, batch).await {
        Ok(()) => {
            txn.commit()?;
            return Ok(vec![Ok(()); batch.len()]);
        }
        Err(err) if err.is_storage() => return Err(err),
        Err(err) => {
            tracing::debug!(error = %err, units = batch.len(), "A merged batch failed; replaying it unit by unit.")
        }
    }
    txn.control("ROLLBACK")?;
    txn.control("BEGIN")?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        txn.control("SAVEPOINT unit")?;
        match run_unit(txn, &job.unit).await {
            Ok(()) => {
                txn.control("RELEASE unit")?;
                results.push(Ok(()));
            }
            Err(err) if err.is_storage() => return Err(err),
            Err(err) => {
                txn.control("ROLLBACK TO unit")?;
                txn.control("RELEASE unit")?;
                results.push(Err(err));
            }
        }
    }
    txn.commit()?;
    Ok(results)
}

/// Runs `fence` first in a batch's transaction (unless the batch is only watchdog
/// heartbeats, which write nothing); when it refuses, the answers: the fence's error
/// for every unit, `Ok` for heartbeats.
async fn fenced(
    txn: &impl ConnectionTrait,
    fence: &Fence,
    batch: &[Job],
) -> Result<(), Vec<Result<(), WriteError>>> {
    if batch.iter().all(|job| job.unit.is_empty()) {
        return Ok(());
    }
    fence.check(txn).await.map_err(|err| {
        batch
            .iter()
            .map(|job| {
                if job.unit.is_empty() {
                    Ok(())
                } else {
                    Err(err.clone())
                }
            })
            .collect()
    })
}

/// The first stretch of every unit — its inserts up to its first other statement —
/// merged by table and shape; then the rest of every unit in its own order. Merged
/// tables are inserted in the schema's creation order (parents before children).
/// Within a unit nothing is reordered: a unit that deletes links and then inserts
/// new ones has its inserts run after its delete.
async fn run_merged(conn: &impl Exec, batch: &[Job]) -> Result<(), WriteError> {
    type GroupKey = (&'static str, Vec<&'static str>, Conflict);
    let mut order: Vec<GroupKey> = Vec::new();
    let mut groups: HashMap<GroupKey, Vec<&[Value]>> = HashMap::new();
    let mut advances: Vec<Vec<&Advance>> = Vec::new();
    let mut rests: Vec<&[Op]> = Vec::with_capacity(batch.len());
    for job in batch {
        let ops = &job.unit.ops;
        let split = ops
            .iter()
            .position(|op| !matches!(op, Op::Insert(_) | Op::Advance(_)))
            .unwrap_or(ops.len());
        for op in &ops[..split] {
            match op {
                Op::Insert(row) => {
                    let key = (row.table, row.columns.clone(), row.conflict.clone());
                    let rows = groups.entry(key.clone()).or_insert_with(|| {
                        order.push(key);
                        Vec::new()
                    });
                    rows.push(&row.values);
                }
                Op::Advance(advance) => {
                    match advances.iter_mut().find(|g| same_shape(g[0], advance)) {
                        Some(group) => group.push(advance),
                        None => advances.push(vec![advance]),
                    }
                }
                Op::Exec { .. } => {}
            }
        }
        rests.push(&ops[split..]);
    }
    // Parents before children, whatever order the units named them in.
    let rank = |table: &str| {
        caremsg_entities::all_tables()
            .iter()
            .position(|t| *t == table)
            .unwrap_or(usize::MAX)
    };
    order.sort_by_key(|key| rank(key.0));
    for key in &order {
        let rows = &groups[key];
        let per_statement =
            (MAX_PARAMS_PER_STATEMENT / key.1.len().max(1)).clamp(1, MAX_ROWS_PER_STATEMENT);
        for chunk in rows.chunks(per_statement) {
            let statement = insert_statement(key.0, &key.1, &key.2, chunk)?;
            conn.build_and_run(&statement).await?;
        }
    }
    for group in &advances {
        for wave in waves(group) {
            advance(conn, wave).await?;
        }
    }
    for rest in rests {
        run_ops(conn, rest).await?;
    }
    Ok(())
}

/// Whether two compare-and-sets can share one statement.
fn same_shape(a: &Advance, b: &Advance) -> bool {
    a.table == b.table
        && a.key.0 == b.key.0
        && a.guard.0 == b.guard.0
        && a.set.len() == b.set.len()
        && a.set.iter().zip(&b.set).all(|(x, y)| x.0 == y.0)
}

/// `group` cut, in order, into statements that each name a row at most once (a
/// second compare-and-set of the same row must see the first one's result) and stay
/// under the parameter limit.
fn waves<'a>(group: &'a [&'a Advance]) -> Vec<&'a [&'a Advance]> {
    let per_row = 2 + 2 * group.first().map_or(0, |a| a.set.len());
    let most = (MAX_PARAMS_PER_STATEMENT / per_row).clamp(1, MAX_ROWS_PER_STATEMENT);
    let mut out = Vec::new();
    let mut start = 0;
    for (i, a) in group.iter().enumerate() {
        let repeats = group[start..i].iter().any(|b| b.key.1 == a.key.1);
        if repeats || i - start == most {
            out.push(&group[start..i]);
            start = i;
        }
    }
    if start < group.len() {
        out.push(&group[start..]);
    }
    out
}

/// Runs compare-and-sets of one shape, each on a different row, as one statement;
/// fails unless every one of them changed its row.
async fn advance(conn: &impl Exec, wave: &[&Advance]) -> Result<(), WriteError> {
    let Some(first) = wave.first() else {
        return Ok(());
    };
    let quote = |name: &str| format!("\"{name}\"");
    let (key, guard) = (quote(first.key.0), quote(first.guard.0));
    let mut values = Vec::with_capacity(wave.len() * (2 + 2 * first.set.len()));
    let sets: Vec<String> = (0..first.set.len())
        .map(|i| {
            let column = quote(first.set[i].0);
            if let [only] = wave {
                values.push(only.set[i].1.clone());
                return format!("{column} = ?");
            }
            let mut case = format!("{column} = CASE {key}");
            for a in wave {
                case.push_str(" WHEN ? THEN ?");
                values.extend([a.key.1.clone(), a.set[i].1.clone()]);
            }
            case.push_str(" END");
            case
        })
        .collect();
    let mut rows = Vec::with_capacity(wave.len());
    for a in wave {
        rows.push(format!("({key} = ? AND {guard} = ?)"));
        values.extend([a.key.1.clone(), a.guard.1.clone()]);
    }
    let sql = format!(
        "UPDATE {} SET {} WHERE {}",
        quote(first.table),
        sets.join(", "),
        rows.join(" OR ")
    );
    let changed = conn
        .run(crate::sql::statement(conn.backend(), &sql, values))
        .await?;
    if changed == wave.len() as u64 {
        Ok(())
    } else {
        Err(WriteError::Precondition(first.what))
    }
}

/// One unit's operations, in order.
async fn run_unit(conn: &impl Exec, unit: &WriteUnit) -> Result<(), WriteError> {
    run_ops(conn, &unit.ops).await
}

async fn run_ops(conn: &impl Exec, ops: &[Op]) -> Result<(), WriteError> {
    for op in ops {
        match op {
            Op::Insert(row) => {
                let statement =
                    insert_statement(row.table, &row.columns, &row.conflict, &[&row.values])?;
                conn.build_and_run(&statement).await?;
            }
            Op::Advance(a) => advance(conn, &[a]).await?,
            Op::Exec {
                statement,
                expect,
                what,
            } => exec(conn, statement, *expect, what).await?,
        }
    }
    Ok(())
}

async fn exec(
    conn: &impl Exec,
    statement: &Statement,
    expect: Expect,
    what: &'static str,
) -> Result<(), WriteError> {
    let changed = match statement {
        Statement::Update(s) => conn.build_and_run(s).await,
        Statement::Delete(s) => conn.build_and_run(s).await,
        Statement::Insert(s) => conn.build_and_run(s).await,
    }?;
    if expect.holds(changed) {
        Ok(())
    } else {
        Err(WriteError::Precondition(what))
    }
}

fn insert_statement(
    table: &'static str,
    columns: &[&'static str],
    conflict: &Conflict,
    rows: &[&[Value]],
) -> Result<InsertStatement, WriteError> {
    let mut statement = Query::insert();
    statement
        .into_table(Alias::new(table))
        .columns(columns.iter().map(|c| Alias::new(*c)));
    for row in rows {
        statement
            .values(row.iter().cloned().map(Expr::val))
            .map_err(|e| WriteError::Database(e.to_string()))?;
    }
    match conflict {
        Conflict::Fail => {}
        Conflict::Update {
            key,
            update,
            forward,
        } => {
            let mut on_conflict = OnConflict::columns(key.iter().map(|c| Alias::new(*c)));
            if update.is_empty() {
                on_conflict.do_nothing();
            } else {
                on_conflict.update_columns(update.iter().map(|c| Alias::new(*c)));
                if let Some(column) = forward {
                    use sea_orm::sea_query::ExprTrait;
                    on_conflict.action_and_where(
                        Expr::col((Alias::new(table), Alias::new(*column)))
                            .lt(Expr::col((Alias::new("excluded"), Alias::new(*column)))),
                    );
                }
            }
            statement.on_conflict(on_conflict);
        }
        Conflict::Ignore(key) => {
            statement.on_conflict(
                OnConflict::columns(key.iter().map(|c| Alias::new(*c)))
                    .do_nothing()
                    .to_owned(),
            );
        }
    }
    Ok(statement)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cas(key: &str, from: i64, to: i64) -> Advance {
        Advance {
            table: "counters",
            key: ("id", key.into()),
            guard: ("n", from.into()),
            set: vec![("n", to.into()), ("note", format!("{key}{to}").into())],
            what: "counter",
        }
    }

    #[test]
    fn a_commit_that_broke_off_is_unknown_and_nothing_else_is_ok() {
        let lost = DbErr::Exec(sea_orm::RuntimeErr::SqlxError(Arc::new(sqlx::Error::Io(
            std::io::ErrorKind::ConnectionReset.into(),
        ))));
        assert!(matches!(
            WriteError::commit_failed(&lost),
            WriteError::OutcomeUnknown(_)
        ));
        // Before the COMMIT, a lost connection stored nothing.
        assert!(matches!(
            WriteError::not_committed(&lost),
            WriteError::Unavailable(_)
        ));
        let other = DbErr::Custom("no such savepoint".into());
        assert!(matches!(
            WriteError::from_db(&other),
            WriteError::Database(_)
        ));
        for failed in [
            WriteError::commit_failed(&other),
            WriteError::not_committed(&other),
        ] {
            assert!(
                matches!(failed, WriteError::Unavailable(_)),
                "a failed batch is a storage fault: {failed:?}"
            );
        }
    }

    #[test]
    fn waves_name_each_row_once_and_keep_the_order() {
        let all = [
            cas("a", 0, 1),
            cas("a", 1, 2),
            cas("b", 0, 1),
            cas("c", 0, 1),
            cas("b", 1, 2),
        ];
        let group: Vec<&Advance> = all.iter().collect();
        let cut: Vec<Vec<String>> = waves(&group)
            .iter()
            .map(|wave| wave.iter().map(|a| format!("{:?}", a.set[1].1)).collect())
            .collect();
        assert_eq!(cut.len(), 3, "{cut:?}");
        assert_eq!(
            waves(&group).iter().map(|w| w.len()).collect::<Vec<_>>(),
            [1, 3, 1]
        );
        assert!(
            cut[1][0].contains("a2") && cut[2][0].contains("b2"),
            "{cut:?}"
        );
        assert!(waves(&[]).is_empty());
    }

    /// An upsert of `sms_consent` that updates only `reason` of an existing row.
    fn consent_reason(phone: &str, reason: &str) -> WriteUnit {
        use caremsg_entities::sms_consent::{ActiveModel, Column};
        use sea_orm::ActiveValue::Set;
        WriteUnit::new().upsert_columns(
            ActiveModel {
                practice_id: Set("p".into()),
                phone: Set(phone.into()),
                opted_out: Set(false),
                reason: Set(Some(reason.into())),
                changed_at: Set(chrono::DateTime::UNIX_EPOCH),
            },
            &[Column::PracticeId, Column::Phone],
            // A key column is never updated.
            &[Column::Reason, Column::Phone],
        )
    }

    #[test]
    fn an_upsert_names_the_columns_it_updates_and_keeps_its_shape() {
        let conflicts: Vec<Conflict> = [consent_reason("a", "x"), consent_reason("b", "y")]
            .iter()
            .map(|unit| match &unit.ops[..] {
                [Op::Insert(row)] => row.conflict.clone(),
                other => panic!("one insert expected: {other:?}"),
            })
            .collect();
        assert_eq!(
            conflicts[0],
            Conflict::Update {
                key: vec!["practice_id", "phone"],
                update: vec!["reason"],
                forward: None,
            }
        );
        // Same table, columns and conflict: the batch merges them into one statement.
        assert_eq!(conflicts[0], conflicts[1]);
        // A plain upsert updates every other column it inserts.
        let plain = WriteUnit::new().upsert(
            caremsg_entities::sms_consent::ActiveModel {
                practice_id: sea_orm::ActiveValue::Set("p".into()),
                phone: sea_orm::ActiveValue::Set("a".into()),
                opted_out: sea_orm::ActiveValue::Set(true),
                ..Default::default()
            },
            &[
                caremsg_entities::sms_consent::Column::PracticeId,
                caremsg_entities::sms_consent::Column::Phone,
            ],
        );
        let [Op::Insert(row)] = &plain.ops[..] else {
            panic!("one insert expected");
        };
        assert_eq!(
            row.conflict,
            Conflict::Update {
                key: vec!["practice_id", "phone"],
                update: vec!["opted_out"],
                forward: None,
            }
        );
    }

    /// Runs `units` as one merged batch after `setup` (temporary tables), in a
    /// transaction rolled back after, on SQLite and, when `DATABASE_URL` names one,
    /// PostgreSQL; returns the rows `query` reads back, once per back end.
    async fn merged_on_each_backend(
        setup: &str,
        units: impl Fn() -> Vec<WriteUnit>,
        query: &str,
    ) -> Vec<Vec<sea_orm::QueryResult>> {
        let mut urls = vec!["sqlite::memory:".to_owned()];
        urls.extend(std::env::var("DATABASE_URL").ok());
        let mut results = Vec::new();
        for url in urls {
            let mut options = sea_orm::ConnectOptions::new(url);
            options.max_connections(1).min_connections(1);
            let db = sea_orm::Database::connect(options).await.unwrap();
            let db = db.begin().await.unwrap();
            db.execute_unprepared(setup).await.unwrap();
            let batch: Vec<Job> = units()
                .into_iter()
                .map(|unit| Job {
                    unit,
                    reply: oneshot::channel().0,
                })
                .collect();
            run_merged(&db, &batch).await.unwrap();
            let statement = sea_orm::Statement::from_string(db.get_database_backend(), query);
            results.push(db.query_all_raw(statement).await.unwrap());
            db.rollback().await.unwrap();
        }
        results
    }

    #[tokio::test]
    async fn a_merged_upsert_updates_only_its_columns() {
        let results = merged_on_each_backend(
            "CREATE TEMPORARY TABLE sms_consent (practice_id TEXT NOT NULL, phone TEXT NOT NULL,
               opted_out BOOLEAN NOT NULL, reason TEXT, changed_at TIMESTAMPTZ NOT NULL,
               PRIMARY KEY (practice_id, phone));
             INSERT INTO sms_consent VALUES ('p', 'a', TRUE, 'patient_stop', '2026-01-01T00:00:00Z');",
            // Two units, merged: one updates its existing row, the other inserts.
            || vec![consent_reason("a", "x"), consent_reason("b", "y")],
            "SELECT phone, opted_out, reason FROM sms_consent ORDER BY phone",
        )
        .await;
        for rows in results {
            let got: Vec<(String, bool, Option<String>)> = rows
                .iter()
                .map(|r| {
                    (
                        r.try_get("", "phone").unwrap(),
                        r.try_get("", "opted_out").unwrap(),
                        r.try_get("", "reason").unwrap(),
                    )
                })
                .collect();
            assert_eq!(
                got,
                [
                    // `opted_out` and `changed_at` were not named: the row keeps them.
                    ("a".into(), true, Some("x".into())),
                    ("b".into(), false, Some("y".into())),
                ]
            );
        }
    }

    /// A forward-only upsert leaves a row whose value is already as far or further,
    /// and moves one that is behind, also in a merged statement.
    #[tokio::test]
    async fn a_forward_upsert_never_moves_a_value_back() {
        let marker = |reader: &str, seq: i64| {
            use caremsg_entities::read_marker;
            WriteUnit::new().upsert_forward(
                read_marker::ActiveModel {
                    patient_id: sea_orm::ActiveValue::Set("p".into()),
                    reader: sea_orm::ActiveValue::Set(reader.into()),
                    last_read_seq: sea_orm::ActiveValue::Set(seq),
                    read_at: sea_orm::ActiveValue::Set(chrono::Utc::now()),
                },
                &[read_marker::Column::PatientId, read_marker::Column::Reader],
                read_marker::Column::LastReadSeq,
            )
        };
        let results = merged_on_each_backend(
            "CREATE TEMPORARY TABLE read_markers (patient_id TEXT NOT NULL, reader TEXT NOT NULL,
               last_read_seq BIGINT NOT NULL, read_at TIMESTAMPTZ NOT NULL,
               PRIMARY KEY (patient_id, reader));
             INSERT INTO read_markers VALUES ('p', 'a', 5, '2026-01-01T00:00:00Z'),
               ('p', 'b', 5, '2026-01-01T00:00:00Z');",
            // Back (a: 3), forward (b: 7) and new (c: 2), merged into one statement.
            || vec![marker("a", 3), marker("b", 7), marker("c", 2)],
            "SELECT reader, last_read_seq FROM read_markers ORDER BY reader",
        )
        .await;
        for rows in results {
            let got: Vec<(String, i64)> = rows
                .iter()
                .map(|r| {
                    (
                        r.try_get("", "reader").unwrap(),
                        r.try_get("", "last_read_seq").unwrap(),
                    )
                })
                .collect();
            assert_eq!(got, [("a".into(), 5), ("b".into(), 7), ("c".into(), 2)]);
        }
    }

    #[tokio::test]
    async fn one_statement_moves_every_row_or_fails() {
        // SQLite, and PostgreSQL when the suite runs against it (typed parameters in
        // CASE), each on one connection holding a temporary table.
        let mut urls = vec!["sqlite::memory:".to_owned()];
        urls.extend(std::env::var("DATABASE_URL").ok());
        for url in urls {
            let mut options = sea_orm::ConnectOptions::new(url);
            options.max_connections(1).min_connections(1);
            let db = sea_orm::Database::connect(options).await.unwrap();
            moves_every_row_or_fails(&db).await;
        }
    }

    async fn moves_every_row_or_fails(db: &DatabaseConnection) {
        let db = db.begin().await.unwrap();
        db.execute_unprepared(
            "CREATE TEMPORARY TABLE counters (id TEXT PRIMARY KEY, n BIGINT NOT NULL, note TEXT);
             INSERT INTO counters VALUES ('a', 0, NULL), ('b', 5, NULL), ('c', 9, NULL);",
        )
        .await
        .unwrap();
        let (a, b) = (cas("a", 0, 1), cas("b", 5, 7));
        advance(&db, &[&a, &b]).await.unwrap();
        let rows = db
            .query_all_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT id, n, note FROM counters ORDER BY id",
            ))
            .await
            .unwrap();
        let got: Vec<(String, i64, Option<String>)> = rows
            .iter()
            .map(|r| {
                (
                    r.try_get("", "id").unwrap(),
                    r.try_get("", "n").unwrap(),
                    r.try_get("", "note").unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a".into(), 1, Some("a1".into())),
                ("b".into(), 7, Some("b7".into())),
                ("c".into(), 9, None)
            ]
        );
        // One stale guard: the statement touches fewer rows than it names.
        let (a, c) = (cas("a", 1, 2), cas("c", 8, 9));
        assert_eq!(
            advance(&db, &[&a, &c]).await,
            Err(WriteError::Precondition("counter"))
        );
        // Alone (the form of the unit-by-unit replay).
        advance(&db, &[&cas("c", 9, 10)]).await.unwrap();
        db.rollback().await.unwrap();
    }
}
