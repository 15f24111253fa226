//! `caremsgd::sqlite_tuning::install` when SQLite is already running, in a process of
//! its own: this file's one test uses SQLite first, then installs. SQLite refuses
//! every process-wide setting once it has initialised; `install` must say which one it
//! refused, make none of them, and leave SQLite working on its defaults (what `main`
//! then runs on, after logging a warning).

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use rusqlite::Connection;

#[test]
fn installed_after_sqlite_started_it_is_refused_and_sqlite_keeps_its_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)",
    )
    .unwrap();

    // SAFETY: this file's only test, on its only thread that uses SQLite; the
    // connection above is idle.
    #[allow(unsafe_code)]
    let installed = unsafe { caremsgd::sqlite_tuning::install() };
    let refused = installed.expect_err("SQLite is initialised: every setting is refused");
    assert_eq!(refused.setting, "SQLITE_CONFIG_MALLOC", "the first refusal");
    assert_eq!(refused.code, rusqlite::ffi::SQLITE_MISUSE);
    // A second call answers the first outcome, and makes nothing either.
    #[allow(unsafe_code)]
    let again = unsafe { caremsgd::sqlite_tuning::install() };
    assert_eq!(again.unwrap_err().setting, "SQLITE_CONFIG_MALLOC");
    assert_eq!(
        caremsgd::sqlite_tuning::describe(),
        "a default: SQLite refused SQLITE_CONFIG_MALLOC (code 21)"
    );

    // SQLite works on its defaults, the old connection and a new one alike; the
    // page-cache wrapper was not installed, so it saw no commit.
    for i in 0..200 {
        conn.execute("INSERT INTO t (v) VALUES (?1)", [format!("row {i}")])
            .unwrap();
    }
    let again = Connection::open(&path).unwrap();
    let count: i64 = again
        .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
        .unwrap();
    assert_eq!(count, 200);
    let check: String = again
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    assert_eq!(caremsgd::sqlite_tuning::truncations(), (0, 0));
}
