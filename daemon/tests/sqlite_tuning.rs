//! The process-wide SQLite settings the binary makes (`caremsgd::sqlite_tuning`), in a
//! process of their own: this file's one test installs them before anything else
//! touches SQLite, as `main` does. It checks that they take, that a commit after
//! b-tree splits no longer truncates the page cache, and that the wrapped cache keeps
//! every promise a database makes: rows written are read back, a rollback that grew
//! the file drops its pages, another connection sees every commit, and the file
//! passes `PRAGMA integrity_check`.

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::collections::BTreeMap;

use rusqlite::{Connection, params};

/// A deterministic key order that is not the insertion order, so that inserts land
/// all over the indexes and split pages in the middle (where SQLite renumbers them).
fn scrambled(i: u64) -> String {
    format!("{:016x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn open(path: &std::path::Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA cache_size = -32768;",
    )
    .unwrap();
    conn
}

fn rows(conn: &Connection) -> BTreeMap<String, Vec<u8>> {
    let mut statement = conn.prepare("SELECT k, v FROM t").unwrap();
    statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn the_tuned_sqlite_keeps_every_row_and_skips_the_commits_cache_scans() {
    // SAFETY: this file's only test, and its first statement: no other thread of the
    // process uses SQLite.
    #[allow(unsafe_code)]
    let installed = unsafe { caremsgd::sqlite_tuning::install() };
    installed.expect("installed before any SQLite use");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let mut writer = open(&path);
    let reader = open(&path);
    writer
        .execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT NOT NULL UNIQUE, v BLOB NOT NULL)",
        )
        .unwrap();

    // What the database must hold.
    let mut model = BTreeMap::new();
    let mut next = 0u64;
    let mut commit =
        |writer: &mut Connection, model: &mut BTreeMap<String, Vec<u8>>, n: u64, keep: bool| {
            let txn = writer.transaction().unwrap();
            let mut added = Vec::new();
            for _ in 0..n {
                let (k, v) = (scrambled(next), next.to_le_bytes().repeat(40));
                txn.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", params![k, v])
                    .unwrap();
                added.push((k, v));
                next += 1;
            }
            if keep {
                txn.commit().unwrap();
                model.extend(added);
            } else {
                txn.rollback().unwrap();
            }
        };

    let (skipped_before, _) = caremsgd::sqlite_tuning::truncations();
    for _ in 0..200 {
        commit(&mut writer, &mut model, 50, true);
    }
    let (skipped, passed) = caremsgd::sqlite_tuning::truncations();
    assert!(
        skipped - skipped_before >= 100,
        "most of 200 commits skip the cache truncation ({} skipped, {passed} passed)",
        skipped - skipped_before
    );
    assert_eq!(rows(&reader), model, "another connection sees every commit");

    // A transaction that grows the file by hundreds of pages, rolled back: its pages
    // past the old end must be dropped, so the truncation runs.
    let pages = |conn: &Connection| -> i64 {
        conn.query_row("PRAGMA page_count", [], |row| row.get(0))
            .unwrap()
    };
    let before = pages(&writer);
    let (_, passed_before) = caremsgd::sqlite_tuning::truncations();
    commit(&mut writer, &mut model, 5_000, false);
    let (_, passed) = caremsgd::sqlite_tuning::truncations();
    assert!(passed > passed_before, "the rollback truncated the cache");
    assert_eq!(pages(&writer), before);
    assert_eq!(
        rows(&writer),
        model,
        "the rollback left the committed rows only"
    );

    // The writer goes on from there, and the pages it reuses hold what it writes.
    for _ in 0..50 {
        commit(&mut writer, &mut model, 100, true);
    }
    assert_eq!(rows(&writer), model);
    assert_eq!(rows(&reader), model);
    drop(writer);
    let fresh = open(&path);
    assert_eq!(rows(&fresh), model, "a new connection reads the file back");
    let check: String = fresh
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}
