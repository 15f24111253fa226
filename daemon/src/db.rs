//! The database of record: connecting (SQLite or PostgreSQL, chosen by the URL) and
//! migrating.
//!
//! SQLite is opened in WAL mode with `synchronous=FULL`, foreign keys on and a busy
//! timeout, so that an acknowledged write survives a power cut and concurrent readers
//! never see a half-written batch.

use std::str::FromStr;
use std::time::Duration;

use caremsg_migration::{Migrator, MigratorTrait};
use sea_orm::{DatabaseConnection, DbBackend, SqlxPostgresConnector, SqlxSqliteConnector};
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
            // 32 MiB of page cache per connection (the default is 2 MiB): the
            // indexes every message and notification touches stay in memory.
            .pragma("cache_size", "-32768")
            .pragma("wal_autocheckpoint", "8192")
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

/// A short name of the back end, for logs and metrics.
pub fn backend_name(db: &DatabaseConnection) -> &'static str {
    match db.get_database_backend() {
        DbBackend::Sqlite => "sqlite",
        DbBackend::Postgres => "postgres",
        _ => "other",
    }
}
