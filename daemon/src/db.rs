//! The database of record: connecting (SQLite or PostgreSQL, chosen by the URL) and
//! migrating.
//!
//! SQLite is opened in WAL mode with `synchronous=FULL`, foreign keys on and a busy
//! timeout, so that an acknowledged write survives a power cut and concurrent readers
//! never see a half-written batch.

use std::str::FromStr;
use std::time::Duration;

use caremsg_migration::{Migrator, MigratorTrait};
use sea_orm::{
    DatabaseConnection, DbBackend, DbErr, RuntimeErr, SqlxPostgresConnector, SqlxSqliteConnector,
};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// Why the database could not be opened or migrated.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names no back end caremsg supports.
    #[error("unsupported database URL scheme (use sqlite:// or postgres://)")]
    UnsupportedScheme,
    /// The URL could not be parsed.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// The state directory for the SQLite file could not be created.
    #[error("cannot create the directory for the SQLite file: {0}")]
    StateDir(std::io::Error),
    /// The driver refused to connect.
    #[error("cannot connect to the database: {0}")]
    Connect(sqlx::Error),
    /// A migration failed; the transaction was rolled back.
    #[error("database migration failed: {0}")]
    Migrate(sea_orm::DbErr),
}

/// How to open the database.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// `sqlite://path?mode=rwc` or `postgres://...`.
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
    /// How long SQLite waits for a lock before failing.
    pub busy_timeout: Duration,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
}

/// Opens the pool for `options.url`.
pub async fn connect(options: &DbOptions) -> Result<DatabaseConnection, DbError> {
    open(options, false).await
}

/// The file of a SQLite URL (`None` for any other back end, and for an in-memory
/// database, which only the pool's own connections can see).
pub fn sqlite_file(url: &str) -> Result<Option<std::path::PathBuf>, DbError> {
    if !url.starts_with("sqlite:") {
        return Ok(None);
    }
    let options =
        SqliteConnectOptions::from_str(url).map_err(|e| DbError::InvalidUrl(e.to_string()))?;
    let path = options.get_filename();
    Ok((!url.contains(":memory:") && !path.as_os_str().is_empty()).then(|| path.to_owned()))
}

/// Opens the group-commit writer's own connection to `options.url`: one connection,
/// kept open for the daemon's life. On SQLite this keeps the writer's page cache
/// warm — a pooled connection drops its cache whenever another connection has
/// committed, and every batch would otherwise start on a cold one — and takes the
/// writer's ever-changing multi-row statements out of the readers' statement caches.
pub async fn connect_writer(options: &DbOptions) -> Result<DatabaseConnection, DbError> {
    open(options, true).await
}

async fn open(options: &DbOptions, dedicated: bool) -> Result<DatabaseConnection, DbError> {
    let (max, min, lifetime) = if dedicated {
        (1, 1, None)
    } else {
        (
            options.max_connections.max(1),
            0,
            Some(Duration::from_secs(30 * 60)),
        )
    };
    let url = options.url.as_str();
    if url.starts_with("sqlite:") {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| DbError::InvalidUrl(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // Statement journals (a multi-row INSERT's undo inside the writer's
            // transaction) in memory rather than in a temporary file.
            .pragma("temp_store", "memory")
            // The writer's connection: 32 MiB of page cache (the default is 2 MiB),
            // so the indexes every message and notification touches stay in memory.
            // A reader's cache is emptied whenever another connection has committed
            // (WAL: pagerBeginReadTransaction -> pager_reset), so a large one buys a
            // reader nothing and costs it: emptying walks the cache's whole hash
            // table, which grows with the most pages it ever held. 2 MiB.
            .pragma("cache_size", if dedicated { "-32768" } else { "-2048" })
            .pragma("wal_autocheckpoint", "8192")
            // No memory map (mmap_size 0, SQLite's default): in WAL mode a
            // connection unmaps the whole file whenever another connection has
            // committed (pagerBeginReadTransaction -> xUnfetch(0)), so a mapped reader
            // pays munmap + mmap + a page fault per page it touches again, where an
            // unmapped one pays one pread per page.
            .busy_timeout(options.busy_timeout);
        if let Some(parent) = connect.get_filename().parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(DbError::StateDir)?;
        }
        let pool = SqlitePoolOptions::new()
            .after_connect(|conn, _| Box::pin(stable_plans(conn)))
            .max_connections(max)
            .min_connections(min)
            .max_lifetime(lifetime)
            .idle_timeout(lifetime.map(|_| Duration::from_secs(10 * 60)))
            // A file cannot drop a connection the way a server can, and sqlx's ping
            // is one more round trip to the connection's worker thread per query.
            .test_before_acquire(false)
            .acquire_timeout(options.connect_timeout)
            .connect_with(connect)
            .await
            .map_err(DbError::Connect)?;
        Ok(SqlxSqliteConnector::from_sqlx_sqlite_pool(pool))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let connect =
            PgConnectOptions::from_str(url).map_err(|e| DbError::InvalidUrl(e.to_string()))?;
        let pool = PgPoolOptions::new()
            .after_connect(|conn, _| Box::pin(cached_page_costs(conn)))
            .max_connections(max)
            .min_connections(min)
            .acquire_timeout(options.connect_timeout)
            .connect_with(connect)
            .await
            .map_err(DbError::Connect)?;
        Ok(SqlxPostgresConnector::from_sqlx_postgres_pool(pool))
    } else {
        Err(DbError::UnsupportedScheme)
    }
}

/// Turns on SQLite's query planner stability guarantee (`SQLITE_DBCONFIG_ENABLE_QPSG`)
/// for `conn`. Without it, a statement whose plan could depend on a bound value —
/// every `LIMIT ?`, which sea-orm writes for each `.one()` — is marked expired each
/// time it is bound again and re-prepared (parsed and planned) on its next step,
/// whatever the statement cache holds: measured at 29% of the daemon's CPU under the
/// conversations benchmark. The plans do not change: caremsg keeps no statistics
/// (no `ANALYZE`) for a bound value to be weighed against.
async fn stable_plans(conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    use std::ffi::c_int;
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: `db` is this connection's open handle, locked for the duration of the
    // call so no other thread uses it; ENABLE_QPSG takes an int (1: on) and an
    // optional int* for the resulting setting (null: not wanted), as declared here.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libsqlite3_sys::sqlite3_db_config(
            db,
            libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_QPSG,
            1 as c_int,
            std::ptr::null_mut::<c_int>(),
        )
    };
    if rc == libsqlite3_sys::SQLITE_OK {
        Ok(())
    } else {
        Err(sqlx::Error::Configuration(
            format!("SQLite refused SQLITE_DBCONFIG_ENABLE_QPSG (code {rc})").into(),
        ))
    }
}

/// The planner's price of a random page read for a session on PostgreSQL, unless
/// the operator chose one (in `postgresql.conf`, for the database or role, or in the
/// URL's `options`): 1.1, the figure PostgreSQL's documentation gives for data that
/// is cached or on SSDs — a clinic's database, which fits in memory.
///
/// PostgreSQL's stock 4.0 prices every index lookup as a disk seek. Measured with
/// `bench clinic`: once the patients table held 12,000 rows, it planned the staff
/// list's joins (51 rows) as sequential scans of `patients` and `conversations`
/// (5.8 ms a list instead of 2.0), and the clinic mix fell to 770–1,163 requests/s in
/// the runs whose `ANALYZE` sample tipped the plan (1,390–1,706 with this setting).
const RANDOM_PAGE_COST: &str = "1.1";

/// Sets [`RANDOM_PAGE_COST`] for `conn`'s session where nobody set one; one round trip.
async fn cached_page_costs(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT set_config('random_page_cost', $1, false) FROM pg_settings \
         WHERE name = 'random_page_cost' AND source = 'default'",
    )
    .bind(RANDOM_PAGE_COST)
    .execute(conn)
    .await
    .map(drop)
}

/// Applies every pending migration. Each runs in a transaction on both back ends
/// (PostgreSQL and SQLite both have transactional DDL), so a failure leaves no
/// half-applied schema.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbError> {
    Migrator::up(db, None).await.map_err(DbError::Migrate)
}

/// Whether every known migration has been applied.
pub async fn migrations_applied(db: &DatabaseConnection) -> Result<bool, sea_orm::DbErr> {
    Ok(Migrator::get_pending_migrations(db).await?.is_empty())
}

/// What a database error says about the storage behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The storage cannot take or serve work now and may later: a full disk, an I/O
    /// error, a lock held past the busy timeout, no connection, a serialization
    /// failure. The request may be retried.
    Storage,
    /// The operation broke off half-way (a lost connection, a protocol error, a
    /// crashed worker, an I/O error): a `COMMIT` that fails so may or may not have
    /// taken effect.
    Interrupted,
}

/// Classifies `err`: `None` for errors that say nothing about the storage (a
/// constraint, a syntax error, a decoding error).
pub fn fault(err: &DbErr) -> Option<Fault> {
    let sqlx = match err {
        DbErr::ConnectionAcquire(_) => return Some(Fault::Storage),
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => e,
        DbErr::Conn(_) => return Some(Fault::Interrupted),
        _ => return None,
    };
    match &**sqlx {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => {
            Some(Fault::Interrupted)
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
            Some(Fault::Storage)
        }
        sqlx::Error::Database(db) => {
            let code = db.code()?;
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                sqlite_fault(code.parse().ok()?)
            } else {
                postgres_storage_state(&code).then_some(Fault::Storage)
            }
        }
        _ => None,
    }
}

/// What a SQLite (extended) result code says: the primary code is its low byte.
pub(crate) fn sqlite_fault(extended: i32) -> Option<Fault> {
    match extended & 0xff {
        // IOERR: a read, write or sync failed half-way.
        10 => Some(Fault::Interrupted),
        // BUSY, LOCKED, NOMEM, READONLY, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB.
        5 | 6 | 7 | 8 | 11 | 13 | 14 | 15 | 26 => Some(Fault::Storage),
        _ => None,
    }
}

/// Whether a PostgreSQL SQLSTATE names a storage fault: connection exceptions (08),
/// insufficient resources (53: disk full, out of memory, too many connections),
/// operator intervention (57P: shutdown, cannot connect now), system errors (58:
/// I/O), serialization failure and deadlock.
fn postgres_storage_state(code: &str) -> bool {
    ["08", "53", "57P", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || matches!(code, "40001" | "40P01")
}

/// Whether the writer's connection is outside any transaction, as both sqlx and
/// the database see it: sqlx's transaction depth is 0 and, on SQLite, the handle is
/// in autocommit mode (`sqlite3_get_autocommit`). On PostgreSQL a connection whose
/// `COMMIT` failed is discarded ([`discard_writer_connection`]) rather than reused,
/// so sqlx's depth is the check.
pub async fn outside_transaction(db: &DatabaseConnection) -> Result<bool, DbErr> {
    let acquire = |e: sqlx::Error| DbErr::Conn(RuntimeErr::SqlxError(e.into()));
    match db.get_database_backend() {
        DbBackend::Sqlite => {
            let mut conn = db
                .get_sqlite_connection_pool()
                .acquire()
                .await
                .map_err(acquire)?;
            if conn.is_in_transaction() {
                return Ok(false);
            }
            let mut handle = conn.lock_handle().await.map_err(acquire)?;
            let raw = handle.as_raw_handle().as_ptr();
            // SAFETY: `raw` is this connection's open handle, locked for the call so
            // no other thread uses it; sqlite3_get_autocommit only reads its state.
            #[allow(unsafe_code)]
            let autocommit = unsafe { libsqlite3_sys::sqlite3_get_autocommit(raw) };
            Ok(autocommit != 0)
        }
        DbBackend::Postgres => {
            let conn = db
                .get_postgres_connection_pool()
                .acquire()
                .await
                .map_err(acquire)?;
            Ok(!conn.is_in_transaction())
        }
        _ => Ok(true),
    }
}

/// Closes the writer's connection and takes it out of its pool, so that the next
/// batch starts on a new one: whatever transaction or savepoints a failed `COMMIT`
/// or `ROLLBACK` left open on it end with it (the database rolls them back). Errors
/// closing a broken connection are of no interest.
pub async fn discard_writer_connection(db: &DatabaseConnection) {
    match db.get_database_backend() {
        DbBackend::Sqlite => {
            if let Ok(conn) = db.get_sqlite_connection_pool().acquire().await {
                let _ = conn.detach().close().await;
            }
        }
        DbBackend::Postgres => {
            if let Ok(conn) = db.get_postgres_connection_pool().acquire().await {
                let _ = conn.detach().close().await;
            }
        }
        _ => {}
    }
}

/// A short name of the back end, for logs and metrics.
pub fn backend_name(db: &DatabaseConnection) -> &'static str {
    match db.get_database_backend() {
        DbBackend::Sqlite => "sqlite",
        DbBackend::Postgres => "postgres",
        _ => "other",
    }
}

/// Databases for unit tests of hand-written SQL: an in-memory SQLite one, and, when
/// `DATABASE_URL` names a PostgreSQL server, a schema of its own there (name starting
/// with `prefix`), each on one connection and migrated. Drop each with
/// [`drop_test_database`].
#[cfg(test)]
pub(crate) async fn test_databases(prefix: &str) -> Vec<(DatabaseConnection, Option<String>)> {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed test.
    use sea_orm::ConnectionTrait;
    let mut urls = vec!["sqlite::memory:".to_owned()];
    urls.extend(
        std::env::var("DATABASE_URL")
            .ok()
            .filter(|u| u.starts_with("postgres")),
    );
    let mut out = Vec::new();
    for url in urls {
        let mut options = sea_orm::ConnectOptions::new(url.clone());
        options.max_connections(1).min_connections(1);
        let db = sea_orm::Database::connect(options).await.unwrap();
        let schema = url
            .starts_with("postgres")
            .then(|| format!("{prefix}_{}", uuid::Uuid::new_v4().simple()));
        if let Some(schema) = &schema {
            db.execute_unprepared(&format!(
                "CREATE SCHEMA {schema}; SET search_path TO {schema}"
            ))
            .await
            .unwrap();
        }
        Migrator::up(&db, None).await.unwrap();
        out.push((db, schema));
    }
    out
}

/// Drops the PostgreSQL schema [`test_databases`] made, if any.
#[cfg(test)]
pub(crate) async fn drop_test_database(db: &DatabaseConnection, schema: Option<String>) {
    #![allow(clippy::unwrap_used)]
    use sea_orm::ConnectionTrait;
    if let Some(schema) = schema {
        db.execute_unprepared(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On PostgreSQL (when `DATABASE_URL` names a server whose `random_page_cost` is
    /// the stock one): the daemon's sessions price a random page read as cached data,
    /// and a price the operator set in the URL is kept.
    #[tokio::test]
    async fn postgres_sessions_price_index_lookups_as_cached_unless_the_operator_chose() {
        #![allow(clippy::unwrap_used)]
        use sea_orm::ConnectionTrait;
        let Some(url) = std::env::var("DATABASE_URL")
            .ok()
            .filter(|u| u.starts_with("postgres"))
        else {
            return;
        };
        let cost = |url: String| async move {
            let db = connect(&DbOptions {
                url,
                max_connections: 1,
                busy_timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(5),
            })
            .await
            .unwrap();
            let row = db
                .query_one_raw(sea_orm::Statement::from_string(
                    DbBackend::Postgres,
                    "SELECT current_setting('random_page_cost'), \
                     (SELECT source FROM pg_settings WHERE name = 'random_page_cost')",
                ))
                .await
                .unwrap()
                .unwrap();
            let cost: String = row.try_get_by_index(0).unwrap();
            let source: String = row.try_get_by_index(1).unwrap();
            (cost, source)
        };
        let (chosen, source) = cost(url.clone()).await;
        if source == "session" {
            assert_eq!(chosen, RANDOM_PAGE_COST);
        } else {
            // The server's operator chose a price: the daemon keeps it.
            assert_ne!(source, "default", "{chosen}");
        }
        let separator = if url.contains('?') { '&' } else { '?' };
        let (chosen, source) =
            cost(format!("{url}{separator}options=-c%20random_page_cost%3D2")).await;
        assert_eq!((chosen.as_str(), source.as_str()), ("2", "client"));
    }

    #[test]
    fn storage_faults_are_told_from_errors_of_the_request() {
        // SQLite: BUSY, BUSY_SNAPSHOT, FULL, READONLY, CANTOPEN are storage faults;
        // IOERR and its extended codes broke off; constraints and errors are not.
        for code in [5, 517, 13, 8, 14] {
            assert_eq!(sqlite_fault(code), Some(Fault::Storage), "{code}");
        }
        for code in [10, 266, 778] {
            assert_eq!(sqlite_fault(code), Some(Fault::Interrupted), "{code}");
        }
        for code in [1, 19, 787, 1555, 2067] {
            assert_eq!(sqlite_fault(code), None, "{code}");
        }
        for state in ["08006", "53100", "57P01", "58030", "40001", "40P01"] {
            assert!(postgres_storage_state(state), "{state}");
        }
        for state in ["23505", "23503", "42601", "22001"] {
            assert!(!postgres_storage_state(state), "{state}");
        }
        let lost = DbErr::Exec(RuntimeErr::SqlxError(std::sync::Arc::new(sqlx::Error::Io(
            std::io::ErrorKind::ConnectionReset.into(),
        ))));
        assert_eq!(fault(&lost), Some(Fault::Interrupted));
        let busy_pool = DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout);
        assert_eq!(fault(&busy_pool), Some(Fault::Storage));
        assert_eq!(fault(&DbErr::Custom("x".into())), None);
    }
}
