//! The writer's SQLite connection: rusqlite, on the writer's own thread.
//!
//! Through sqlx every statement of a batch is a round trip to the connection's own
//! worker thread (two thread hand-offs, and on a busy machine two waits for a core);
//! under the clinic mix the writer was busy 99% of the time, at about 12 ms for a
//! batch of 33 units. Here a batch's statements run where the batch is built, with
//! prepared statements kept per connection. The connection is opened with the same
//! settings as the readers' ([`crate::db`]): WAL, `synchronous=FULL`, foreign keys,
//! the busy timeout, a 32 MiB page cache.
//!
//! **Checkpoints** run on a connection and thread of their own ([`Checkpointer`]),
//! not in the writer's commits: SQLite's automatic checkpoint runs inside the commit
//! that crosses its threshold, and every write waited behind it (about 45 commits
//! of 16 ms or more per 10 s of the clinic mix, the mix's p99). The writer asks for
//! one every [`CHECKPOINT_EVERY`] commits; the checkpointer also runs one each
//! second. A `PASSIVE` checkpoint copies what it can without blocking the writer or
//! the readers; the writer starts the WAL over once everything in it is copied. The
//! writer keeps an automatic checkpoint at [`WAL_SAFETY_NET`] frames in case the
//! checkpointer cannot keep up.
//!
//! Values are bound exactly as sqlx binds them for SQLite (the readers compare what
//! this writes with values sqlx binds): booleans and integers as integers, text as
//! text, a `DateTime` as RFC 3339 text (`to_rfc3339_opts(AutoSi, false)`; a UTC one
//! through [`crate::rfc3339`], which writes the same text without `core::fmt`), a date
//! as `%F`, JSON as its text.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use rusqlite::types::Value as Sql;
use rusqlite::{Connection, OpenFlags};
use sea_orm::{DbBackend, Value};

use super::{Exec, WriteError};
use crate::db::Fault;
use crate::rfc3339::Zone;

/// Prepared statements kept per connection: the writer's statement shapes (each
/// merged insert's row count is a shape of its own).
const STATEMENT_CACHE: usize = 256;

/// Commits between the writer's requests for a checkpoint.
const CHECKPOINT_EVERY: u32 = 16;

/// WAL frames past which the writer's own commit checkpoints (SQLite's automatic
/// checkpoint), should the checkpointer fall behind: 256 MiB of 4 KiB pages.
const WAL_SAFETY_NET: i64 = 65_536;

/// How long the checkpointer waits for a request before it checkpoints anyway.
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// The writer's SQLite database: where it is, and the open connection, if any.
pub struct SqliteStore {
    path: PathBuf,
    busy_timeout: Duration,
    conn: Option<Connection>,
    checkpointer: Option<Checkpointer>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("open", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// The database file at `path` (opened on first use, and again after a
    /// failure).
    pub fn new(path: &Path, busy_timeout: Duration) -> Self {
        Self {
            path: path.to_owned(),
            busy_timeout,
            conn: None,
            checkpointer: Checkpointer::start(path, busy_timeout),
        }
    }

    /// After a batch committed: every [`CHECKPOINT_EVERY`] commits, asks the
    /// checkpointer for a checkpoint (never waits for it).
    pub(super) fn committed(&mut self) {
        if let Some(checkpointer) = &mut self.checkpointer {
            checkpointer.commits = checkpointer.commits.wrapping_add(1);
            if checkpointer.commits % CHECKPOINT_EVERY == 0 {
                match checkpointer.requests.try_send(()) {
                    // Full: one is asked for already.
                    Ok(()) | Err(TrySendError::Full(())) => {}
                    Err(TrySendError::Disconnected(())) => {
                        tracing::error!(
                            "The WAL checkpointer has stopped; the writer's commits checkpoint again."
                        );
                        self.checkpointer = None;
                        self.conn = None;
                    }
                }
            }
        }
    }

    /// The open connection, opened first if there is none.
    pub(super) fn conn(&mut self) -> Result<&Connection, WriteError> {
        if self.conn.is_none() {
            let conn = open(&self.path, self.busy_timeout).map_err(not_committed)?;
            // Without a checkpointer (it could not start or has stopped), SQLite's
            // default: the committing connection checkpoints at 1,000 frames.
            let automatic = if self.checkpointer.is_some() {
                WAL_SAFETY_NET
            } else {
                1_000
            };
            conn.pragma_update(None, "wal_autocheckpoint", automatic)
                .map_err(not_committed)?;
            self.conn = Some(conn);
        }
        self.conn
            .as_ref()
            .ok_or_else(|| WriteError::Unavailable("no connection".into()))
    }

    /// Closes the connection (SQLite rolls back whatever transaction it was in); the
    /// next batch opens a new one.
    pub(super) fn discard(&mut self) {
        self.conn = None;
    }

    /// Whether the connection is outside any transaction (autocommit).
    pub(super) fn outside_transaction(&mut self) -> Result<bool, WriteError> {
        Ok(self.conn()?.is_autocommit())
    }
}

fn open(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    // The mode is the database's (the readers set it first); asked again, it answers
    // with a row.
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "memory")?;
    conn.pragma_update(None, "cache_size", -32768)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// The checkpointer's thread, as the writer sees it: where to ask for a checkpoint.
/// The thread ends when the writer's store is dropped.
struct Checkpointer {
    requests: SyncSender<()>,
    commits: u32,
}

impl Checkpointer {
    /// Starts the thread (`None`, logged, if it cannot be: the writer's commits then
    /// checkpoint as SQLite does by default).
    fn start(path: &Path, busy_timeout: Duration) -> Option<Self> {
        let (requests, asked) = std::sync::mpsc::sync_channel(1);
        let path = path.to_owned();
        match std::thread::Builder::new()
            .name("caremsg-checkpoint".into())
            .spawn(move || checkpoint_loop(&path, busy_timeout, &asked))
        {
            Ok(_) => Some(Self {
                requests,
                commits: 0,
            }),
            Err(error) => {
                tracing::error!(%error, "The WAL checkpointer could not start; the writer's commits checkpoint.");
                None
            }
        }
    }
}

/// Checkpoints when asked, and each [`CHECKPOINT_IDLE`] without a request, until the
/// writer's store is dropped. A failure (a full disk, say) closes the connection;
/// the next round opens a new one.
fn checkpoint_loop(path: &Path, busy_timeout: Duration, asked: &Receiver<()>) {
    let mut conn: Option<Connection> = None;
    loop {
        match asked.recv_timeout(CHECKPOINT_IDLE) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if conn.is_none() {
            conn = open(path, busy_timeout)
                .inspect_err(|error| tracing::debug!(%error, "The WAL checkpointer cannot open the database."))
                .ok();
        }
        if let Some(c) = &conn
            && let Err(error) = checkpoint(c)
        {
            tracing::debug!(%error, "A WAL checkpoint failed; it is tried again.");
            conn = None;
        }
    }
}

/// One `PASSIVE` checkpoint: (frames in the WAL, frames copied to the database).
fn checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get(1)?, row.get(2)?))
    })
}

/// A batch's transaction on the writer's connection.
pub(super) struct SqliteTxn<'c>(pub(super) &'c Connection);

impl SqliteTxn<'_> {
    /// Runs a transaction-control statement (`BEGIN`, `SAVEPOINT`, `RELEASE`,
    /// `ROLLBACK`): a failure means nothing of the batch is committed.
    pub(super) fn control(&self, sql: &str) -> Result<(), WriteError> {
        self.0
            .prepare_cached(sql)
            .and_then(|mut statement| statement.raw_execute())
            .map(|_| ())
            .map_err(not_committed)
    }

    /// `COMMIT`: a failure that broke off half-way (an I/O error) leaves the outcome
    /// unknown.
    pub(super) fn commit(&self) -> Result<(), WriteError> {
        self.0
            .prepare_cached("COMMIT")
            .and_then(|mut statement| statement.raw_execute())
            .map(|_| ())
            .map_err(|err| match fault(&err) {
                Some(Fault::Interrupted) => WriteError::OutcomeUnknown(err.to_string()),
                _ => not_committed(err),
            })
    }
}

impl Exec for SqliteTxn<'_> {
    fn backend(&self) -> DbBackend {
        DbBackend::Sqlite
    }

    async fn run(&self, statement: sea_orm::Statement) -> Result<u64, WriteError> {
        let mut prepared = self.0.prepare_cached(&statement.sql).map_err(from_sqlite)?;
        if let Some(values) = statement.values {
            for (i, value) in values.0.iter().enumerate() {
                prepared
                    .raw_bind_parameter(i + 1, bind(value)?)
                    .map_err(from_sqlite)?;
            }
        }
        let changed = prepared.raw_execute().map_err(from_sqlite)?;
        Ok(changed as u64)
    }
}

/// `value` as sqlx binds it for SQLite (sea-query-sqlx's `SqlxValues`).
fn bind(value: &Value) -> Result<Sql, WriteError> {
    let text = |s: String| Sql::Text(s);
    let bound = match value {
        Value::Bool(v) => v.map(|b| Sql::Integer(i64::from(b))),
        Value::TinyInt(v) => v.map(|n| Sql::Integer(n.into())),
        Value::SmallInt(v) => v.map(|n| Sql::Integer(n.into())),
        Value::Int(v) => v.map(|n| Sql::Integer(n.into())),
        Value::BigInt(v) => v.map(Sql::Integer),
        Value::TinyUnsigned(v) => v.map(|n| Sql::Integer(n.into())),
        Value::SmallUnsigned(v) => v.map(|n| Sql::Integer(n.into())),
        Value::Unsigned(v) => v.map(|n| Sql::Integer(n.into())),
        Value::BigUnsigned(v) => match v {
            Some(n) => Some(Sql::Integer(i64::try_from(*n).map_err(|_| {
                WriteError::Database("an unsigned value too large for SQLite".into())
            })?)),
            None => None,
        },
        Value::Float(v) => v.map(|f| Sql::Real(f.into())),
        Value::Double(v) => v.map(Sql::Real),
        Value::String(v) => v.clone().map(text),
        Value::Char(v) => v.map(|c| text(c.to_string())),
        Value::Enum(e) => match e {
            sea_orm::sea_query::OptionEnum::Some(v) => Some(text(v.value.to_string())),
            sea_orm::sea_query::OptionEnum::None(_) => None,
        },
        Value::Bytes(v) => v.clone().map(Sql::Blob),
        Value::Json(v) => match v {
            Some(json) => Some(text(serde_json::to_string(json).map_err(|e| {
                WriteError::Database(format!("a JSON value could not be written: {e}"))
            })?)),
            None => None,
        },
        Value::ChronoDate(v) => v.map(|d| text(d.format("%F").to_string())),
        Value::ChronoTime(v) => v.map(|t| text(t.format("%T%.f").to_string())),
        Value::ChronoDateTime(v) => v.map(|t| text(t.format("%F %T%.f").to_string())),
        Value::ChronoDateTimeUtc(v) => v.map(|t| text(crate::rfc3339::to_string(&t, Zone::Offset))),
        Value::ChronoDateTimeLocal(v) => v.map(|t| text(rfc3339(&t))),
        Value::ChronoDateTimeWithTimeZone(v) => v.map(|t| text(rfc3339(&t))),
        #[allow(unreachable_patterns)] // Which others exist depends on sea-query's features.
        _ => {
            return Err(WriteError::Database(
                "a value of a type the SQLite writer does not bind".into(),
            ));
        }
    };
    Ok(bound.unwrap_or(Sql::Null))
}

fn rfc3339<Tz: chrono::TimeZone>(t: &chrono::DateTime<Tz>) -> String
where
    Tz::Offset: std::fmt::Display,
{
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
}

/// The extended result code of a SQLite error, if it is one.
fn code(err: &rusqlite::Error) -> Option<i32> {
    match err {
        rusqlite::Error::SqliteFailure(e, _) => Some(e.extended_code),
        _ => None,
    }
}

fn fault(err: &rusqlite::Error) -> Option<Fault> {
    crate::db::sqlite_fault(code(err)?)
}

/// A statement's error, as the sqlx path classifies it: a unique or primary key
/// violation, a missing reference, a storage fault, or an error of the unit.
fn from_sqlite(err: rusqlite::Error) -> WriteError {
    match code(&err) {
        // SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_PRIMARYKEY.
        Some(2067 | 1555) => WriteError::Conflict(err.to_string()),
        // SQLITE_CONSTRAINT_FOREIGNKEY.
        Some(787) => WriteError::MissingReference(err.to_string()),
        _ if fault(&err).is_some() => WriteError::Unavailable(err.to_string()),
        _ => WriteError::Database(err.to_string()),
    }
}

/// The error of a `BEGIN`, `ROLLBACK` or connection that failed: nothing committed.
fn not_committed(err: rusqlite::Error) -> WriteError {
    match from_sqlite(err) {
        storage @ WriteError::Unavailable(_) => storage,
        other => WriteError::Unavailable(other.to_string()),
    }
}

/// The probe write on SQLite: the database header's `user_version` set to the value
/// it has, in a transaction of its own (its page goes to the WAL at `COMMIT`).
pub(super) fn probe_write(conn: &Connection) -> Result<(), WriteError> {
    let txn = SqliteTxn(conn);
    txn.control("BEGIN")?;
    let wrote = conn
        .query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))
        .and_then(|version| conn.pragma_update(None, "user_version", version));
    if let Err(err) = wrote {
        let error = not_committed(err);
        txn.control("ROLLBACK")?;
        return Err(error);
    }
    txn.commit()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed test.

    use super::*;

    #[test]
    fn values_are_bound_as_sqlx_binds_them() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-06T04:05:06.250Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            bind(&Value::from(at)).unwrap(),
            Sql::Text("2026-12-06T04:05:06.250+00:00".into())
        );
        let date = chrono::NaiveDate::from_ymd_opt(1950, 1, 2).unwrap();
        assert_eq!(
            bind(&Value::from(date)).unwrap(),
            Sql::Text("1950-01-02".into())
        );
        assert_eq!(bind(&Value::from(true)).unwrap(), Sql::Integer(1));
        assert_eq!(bind(&Value::from(7_i32)).unwrap(), Sql::Integer(7));
        assert_eq!(bind(&Value::String(None)).unwrap(), Sql::Null);
        assert_eq!(
            bind(&Value::from(serde_json::json!({"a": [1]}))).unwrap(),
            Sql::Text("{\"a\":[1]}".into())
        );
        assert!(bind(&Value::BigUnsigned(Some(u64::MAX))).is_err());
    }

    #[test]
    fn the_writers_commits_leave_checkpoints_to_the_checkpointer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let mut store = SqliteStore::new(&path, Duration::from_secs(5));
        // Without its thread, so that only this test checkpoints.
        store.checkpointer = Some(Checkpointer {
            requests: std::sync::mpsc::sync_channel(1).0,
            commits: 0,
        });
        let conn = store.conn().unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
            .unwrap();
        let txn = SqliteTxn(conn);
        let body = "x".repeat(2000);
        for i in 0..1500 {
            txn.control("BEGIN").unwrap();
            conn.execute("INSERT INTO t VALUES (?, ?)", (i, &body))
                .unwrap();
            txn.commit().unwrap();
        }
        // More frames than SQLite's default threshold (1,000), none copied.
        let other = open(&path, Duration::from_secs(5)).unwrap();
        let (frames, copied) = checkpoint(&other).unwrap();
        assert!(frames > 1000, "{frames} frames in the WAL");
        assert_eq!(
            copied, frames,
            "a checkpoint from its own connection copies them all"
        );
    }

    /// The automatic checkpoint of the writer's connection: the safety net while the
    /// checkpointer runs; SQLite's default once it has stopped, noticed at the next
    /// request, after which the writer's own commits keep the WAL short again.
    #[test]
    fn a_stopped_checkpointer_gives_checkpoints_back_to_the_writers_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let mut store = SqliteStore::new(&path, Duration::from_secs(5));
        let (requests, asked) = std::sync::mpsc::sync_channel(1);
        store.checkpointer = Some(Checkpointer {
            requests,
            commits: 0,
        });
        let automatic = |store: &mut SqliteStore| -> i64 {
            store
                .conn()
                .unwrap()
                .pragma_query_value(None, "wal_autocheckpoint", |row| row.get(0))
                .unwrap()
        };
        assert_eq!(automatic(&mut store), WAL_SAFETY_NET);
        store
            .conn()
            .unwrap()
            .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
            .unwrap();
        // The checkpointer's thread ends.
        drop(asked);
        let body = "x".repeat(2000);
        for i in 0..1500 {
            let conn = store.conn().unwrap();
            let txn = SqliteTxn(conn);
            txn.control("BEGIN").unwrap();
            conn.execute("INSERT INTO t VALUES (?, ?)", (i, &body))
                .unwrap();
            txn.commit().unwrap();
            store.committed();
        }
        assert!(store.checkpointer.is_none(), "the stop was not noticed");
        assert_eq!(automatic(&mut store), 1_000);
        // The writer's commits checkpointed: the WAL restarted, well short of the
        // 1,500 commits' frames.
        let other = open(&path, Duration::from_secs(5)).unwrap();
        let (frames, _) = checkpoint(&other).unwrap();
        assert!(frames < 1_100, "{frames} frames in the WAL");
    }

    #[test]
    fn errors_are_classified_as_the_sqlx_path_classifies_them() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "PRAGMA foreign_keys = ON; CREATE TABLE p (id TEXT PRIMARY KEY); \
             CREATE TABLE c (id TEXT PRIMARY KEY, p TEXT REFERENCES p(id), u TEXT UNIQUE); \
             INSERT INTO p VALUES ('a'); INSERT INTO c VALUES ('x', 'a', 'u');",
        )
        .unwrap();
        let txn = SqliteTxn(&conn);
        let run = |sql: &str| {
            futures::executor::block_on(
                txn.run(sea_orm::Statement::from_string(DbBackend::Sqlite, sql)),
            )
        };
        assert!(matches!(
            run("INSERT INTO c VALUES ('y', 'a', 'u')"),
            Err(WriteError::Conflict(what)) if what.contains("c.u")
        ));
        assert!(matches!(
            run("INSERT INTO c VALUES ('x', 'a', 'v')"),
            Err(WriteError::Conflict(_))
        ));
        assert!(matches!(
            run("INSERT INTO c VALUES ('z', 'nobody', 'w')"),
            Err(WriteError::MissingReference(_))
        ));
        assert!(matches!(
            run("INSERT INTO nowhere VALUES (1)"),
            Err(WriteError::Database(_))
        ));
        assert_eq!(run("UPDATE c SET u = 'w' WHERE p = 'a'").unwrap(), 1);
    }
}
