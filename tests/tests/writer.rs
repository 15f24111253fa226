//! The group-commit writer against a real database: batching, isolation of a failing
//! unit, and answers given only after commit.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::sync::Arc;

use caremsg_entities::{Channel, Direction, SmsStatus, conversation, message, patient, practice};
use caremsg_tests::TestDb;
use caremsgd::metrics::Metrics;
use caremsgd::writer::{Expect, WriteError, WriteUnit, Writer, WriterOptions};
use chrono::Utc;
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Database, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter, QueryTrait,
};
use tokio_util::sync::CancellationToken;

async fn setup() -> (tempfile::TempDir, TestDb, DatabaseConnection) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(dir.path()).await.unwrap();
    let options = caremsgd::db::DbOptions {
        url: db.url(),
        max_connections: 4,
        busy_timeout: std::time::Duration::from_secs(5),
        connect_timeout: std::time::Duration::from_secs(5),
    };
    let conn = caremsgd::db::connect(&options).await.unwrap();
    caremsgd::db::migrate(&conn).await.unwrap();
    let now = Utc::now();
    let unit = WriteUnit::new()
        .insert(practice::ActiveModel {
            id: Set("p".into()),
            name: Set("Clinic".into()),
            sms_enabled: Set(true),
            portal_enabled: Set(true),
            country: Set("US".into()),
            timezone: Set("UTC".into()),
            sign_outbound_sms: Set(false),
            active: Set(true),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .merge(patient_with_conversation("pat"));
    let (writer, task, stop) = start_for(&db, &conn);
    writer.write(unit).await.unwrap();
    stop.cancel();
    task.join().await;
    (dir, db, conn)
}

/// An active patient `id` of practice `p` with its empty conversation.
fn patient_with_conversation(id: &str) -> WriteUnit {
    let now = Utc::now();
    WriteUnit::new()
        .insert(patient::ActiveModel {
            id: Set(id.into()),
            practice_id: Set("p".into()),
            first_name: Set("A".into()),
            last_name: Set("B".into()),
            search_name: Set("a b".into()),
            date_of_birth: Set(chrono::NaiveDate::from_ymd_opt(1950, 1, 1).unwrap()),
            mobile_phone: Set(None),
            portal_enrolled: Set(true),
            sms_status: Set(SmsStatus::None),
            sms_status_reason: Set(None),
            last_activity_at: Set(None),
            active: Set(true),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .insert(conversation::ActiveModel {
            patient_id: Set(id.into()),
            practice_id: Set("p".into()),
            last_seq: Set(0),
            last_message_at: Set(None),
            created_at: Set(now),
        })
}

/// The writer the daemon runs on `db`: on a SQLite file its own connection driven by
/// its thread (`Writer::start_sqlite`), on PostgreSQL a sea-orm connection.
fn start_for(
    db: &TestDb,
    conn: &DatabaseConnection,
) -> (Writer, caremsgd::writer::WriterTask, CancellationToken) {
    let Ok(Some(path)) = caremsgd::db::sqlite_file(&db.url()) else {
        return start(conn);
    };
    started(|options, metrics, stop| {
        Writer::start_sqlite(
            caremsgd::writer::SqliteStore::new(&path, std::time::Duration::from_secs(5)),
            options,
            metrics,
            stop,
        )
    })
}

/// A writer on the sea-orm connection `conn` (on SQLite, the path the daemon no
/// longer takes; the full-disk test needs it to set `max_page_count` on the writer's
/// own connection).
fn start(conn: &DatabaseConnection) -> (Writer, caremsgd::writer::WriterTask, CancellationToken) {
    started(|options, metrics, stop| Writer::start(conn.clone(), options, metrics, stop))
}

/// A writer started by `start` with the tests' options, and its stop switch.
fn started(
    start: impl FnOnce(
        WriterOptions,
        Arc<Metrics>,
        CancellationToken,
    ) -> std::io::Result<(Writer, caremsgd::writer::WriterTask)>,
) -> (Writer, caremsgd::writer::WriterTask, CancellationToken) {
    let stop = CancellationToken::new();
    let (writer, task) = start(
        WriterOptions {
            max_batch_units: 512,
            queue_depth: 1024,
        },
        Arc::new(Metrics::new()),
        stop.clone(),
    )
    .unwrap();
    (writer, task, stop)
}

fn message(seq: i64) -> message::ActiveModel {
    message::ActiveModel {
        id: Set(format!("m{seq}-{}", uuid::Uuid::new_v4())),
        patient_id: Set("pat".into()),
        seq: Set(seq),
        direction: Set(Direction::FromPatient),
        channel: Set(Channel::Portal),
        author_user_id: Set(None),
        body: Set("hello".into()),
        client_txn_key: Set(None),
        gateway: Set(None),
        provider_message_id: Set(None),
        possible_opt_out: Set(false),
        read_by_patient_at: Set(None),
        created_at: Set(Utc::now()),
    }
}

#[tokio::test]
async fn a_failing_unit_does_not_fail_its_batch_mates() {
    let (_dir, db, conn) = setup().await;
    let (writer, task, stop) = start_for(&db, &conn);
    writer
        .write(WriteUnit::new().insert(message(1)))
        .await
        .unwrap();

    // Queue ten units while the writer is paused, so they share one batch: seq 1 is
    // taken, so unit 5 violates (patient_id, seq); unit 7 fails its precondition.
    writer.pause();
    let mut handles = Vec::new();
    for i in 2..=11_i64 {
        let writer = writer.clone();
        let unit = match i {
            5 => WriteUnit::new().insert(message(1)),
            7 => WriteUnit::new().insert(message(7)).exec(
                conversation::Entity::update_many()
                    .col_expr(conversation::Column::LastSeq, Expr::value(99))
                    .filter(conversation::Column::PatientId.eq("nobody"))
                    .into_query(),
                Expect::Exactly(1),
                "conversation exists",
            ),
            _ => WriteUnit::new().insert(message(i)),
        };
        handles.push(tokio::spawn(async move { (i, writer.write(unit).await) }));
    }
    while writer.queued() < 10 {
        tokio::task::yield_now().await;
    }
    writer.resume();
    for handle in handles {
        let (i, result) = handle.await.unwrap();
        match i {
            5 => assert!(
                matches!(result, Err(WriteError::Conflict(_))),
                "unit 5: {result:?}"
            ),
            7 => assert_eq!(result, Err(WriteError::Precondition("conversation exists"))),
            _ => assert_eq!(result, Ok(()), "unit {i}"),
        }
    }
    let stored = message::Entity::find().count(&conn).await.unwrap();
    assert_eq!(
        stored, 9,
        "seq 1 plus the eight good units; neither failing unit left a row"
    );
    let seven = message::Entity::find()
        .filter(message::Column::Seq.eq(7))
        .count(&conn)
        .await
        .unwrap();
    assert_eq!(
        seven, 0,
        "the failing unit's own insert was rolled back with it"
    );
    stop.cancel();
    task.join().await;
    conn.close().await.unwrap();
    db.drop_database().await;
}

/// Moves `patient`'s conversation from `from` to `to`, with a message at `to`.
fn advance(patient: &str, from: i64, to: i64) -> WriteUnit {
    use conversation::Column as C;
    let mut row = message(to);
    row.patient_id = Set(patient.to_owned());
    WriteUnit::new().insert(row).compare_and_set(
        (C::PatientId, patient.into()),
        (C::LastSeq, from.into()),
        vec![
            (C::LastSeq, to.into()),
            (C::LastMessageAt, Some(Utc::now()).into()),
        ],
        "conversation sequence",
    )
}

#[tokio::test]
async fn compare_and_sets_share_a_batch_and_a_stale_one_fails_alone() {
    let (_dir, db, conn) = setup().await;
    let (writer, task, stop) = start_for(&db, &conn);
    for other in ["pat2", "pat3"] {
        writer
            .write(patient_with_conversation(other))
            .await
            .unwrap();
    }

    // One batch, in this order: the same row twice (the second sees the first),
    // another row, and a stale guard (pat3 is at 0, not 5).
    writer.pause();
    let resume = {
        let writer = writer.clone();
        tokio::spawn(async move {
            while writer.queued() < 4 {
                tokio::task::yield_now().await;
            }
            writer.resume();
        })
    };
    let (a, b, c, d) = tokio::join!(
        writer.write(advance("pat", 0, 1)),
        writer.write(advance("pat", 1, 2)),
        writer.write(advance("pat2", 0, 1)),
        writer.write(advance("pat3", 5, 6)),
    );
    resume.await.unwrap();
    assert_eq!((a, b, c), (Ok(()), Ok(()), Ok(())));
    assert_eq!(d, Err(WriteError::Precondition("conversation sequence")));
    let seq = |id: &'static str| {
        let conn = conn.clone();
        async move {
            conversation::Entity::find_by_id(id.to_owned())
                .one(&conn)
                .await
                .unwrap()
                .unwrap()
                .last_seq
        }
    };
    assert_eq!(
        (seq("pat").await, seq("pat2").await, seq("pat3").await),
        (2, 1, 0)
    );
    let messages = |id: &'static str| {
        message::Entity::find()
            .filter(message::Column::PatientId.eq(id))
            .count(&conn)
    };
    assert_eq!(messages("pat").await.unwrap(), 2);
    assert_eq!(
        messages("pat3").await.unwrap(),
        0,
        "the stale unit's insert is rolled back"
    );

    // Alone, a stale guard fails too (the unit-by-unit path).
    assert_eq!(
        writer.write(advance("pat2", 0, 2)).await,
        Err(WriteError::Precondition("conversation sequence"))
    );
    assert_eq!(seq("pat2").await, 1);
    stop.cancel();
    task.join().await;
    conn.close().await.unwrap();
    db.drop_database().await;
}

#[tokio::test]
async fn callers_are_answered_only_after_commit() {
    let (_dir, db, conn) = setup().await;
    let (writer, task, stop) = start_for(&db, &conn);
    let other = Database::connect(db.url()).await.unwrap();
    let mut handles = Vec::new();
    for seq in 1..=64_i64 {
        let writer = writer.clone();
        let url = db.url();
        handles.push(tokio::spawn(async move {
            let row = message(seq);
            let id = match &row.id {
                sea_orm::ActiveValue::Set(id) => id.clone(),
                _ => unreachable!(),
            };
            writer.write(WriteUnit::new().insert(row)).await.unwrap();
            (id, url)
        }));
    }
    for handle in handles {
        let (id, _) = handle.await.unwrap();
        // A separate connection, not the writer's pool, sees the row the moment the
        // caller is answered.
        let found = message::Entity::find_by_id(id).one(&other).await.unwrap();
        assert!(
            found.is_some(),
            "an acknowledged write is visible to another connection"
        );
    }
    stop.cancel();
    task.join().await;
    // After the writer stopped, a write is refused rather than lost.
    assert_eq!(
        writer.write(WriteUnit::new().insert(message(100))).await,
        Err(WriteError::Closed)
    );
    other.close().await.unwrap();
    conn.close().await.unwrap();
    db.drop_database().await;
}

/// Units of `count` messages with 8,000-character bodies, from seq `from` on.
fn big_messages(from: i64, count: i64) -> WriteUnit {
    (from..from + count).fold(WriteUnit::new(), |unit, seq| {
        let mut row = message(seq);
        row.body = Set("x".repeat(8_000));
        unit.insert(row)
    })
}

/// Whether the message `id` is stored, read on a connection of its own.
async fn stored_elsewhere(url: &str, id: &str) -> bool {
    let other = Database::connect(url).await.unwrap();
    let found = message::Entity::find_by_id(id.to_owned())
        .one(&other)
        .await
        .unwrap()
        .is_some();
    other.close().await.unwrap();
    found
}

fn id_of(row: &message::ActiveModel) -> String {
    match &row.id {
        sea_orm::ActiveValue::Set(id) => id.clone(),
        _ => unreachable!(),
    }
}

/// The reproduction of issue 12, in process and deterministic: SQLite's page limit
/// (`PRAGMA max_page_count`, per connection) stands in for a full disk on the
/// writer's own connection. Once space "returns", every write the writer
/// acknowledges — alone, and in a batch whose merged attempt fails and is replayed —
/// must be readable from another connection, and again after the writer stops.
#[tokio::test]
async fn after_a_full_disk_no_write_is_acknowledged_without_its_commit() {
    let (_dir, db, conn) = setup().await;
    let caremsg_tests::TestDb::Sqlite(_) = &db else {
        conn.close().await.unwrap();
        db.drop_database().await;
        return; // SQLite's page limit; PostgreSQL has its own test below.
    };
    let options = caremsgd::db::DbOptions {
        url: db.url(),
        max_connections: 1,
        busy_timeout: std::time::Duration::from_secs(5),
        connect_timeout: std::time::Duration::from_secs(5),
    };
    let writer_db = caremsgd::db::connect_writer(&options).await.unwrap();
    // Leaves `room` pages free on the writer's connection (a "disk" of that size).
    let room = |room: i64| {
        let writer_db = writer_db.clone();
        async move {
            use sea_orm::ConnectionTrait;
            let row = writer_db
                .query_one_raw(sea_orm::Statement::from_string(
                    writer_db.get_database_backend(),
                    "PRAGMA page_count",
                ))
                .await
                .unwrap()
                .unwrap();
            let pages: i64 = row.try_get_by_index(0).unwrap();
            writer_db
                .execute_unprepared(&format!("PRAGMA max_page_count = {}", pages + room))
                .await
                .unwrap();
        }
    };
    // A few pages of room: the first big writes fit, then the "disk" is full. (A
    // writer that replaces its connection after a failure gets the limit again.)
    room(8).await;
    let (writer, task, stop) = start(&writer_db);
    let mut acked = Vec::new();
    let mut failed = 0;
    let mut seq = 1;
    while failed < 3 && seq < 200 {
        if failed > 0 {
            room(0).await;
        }
        let unit = big_messages(seq, 1);
        match writer.write(unit).await {
            Ok(()) => acked.push(seq),
            Err(err) => {
                failed += 1;
                eprintln!("write of seq {seq} failed as the disk is full: {err}");
            }
        }
        seq += 1;
    }
    assert_eq!(failed, 3, "the page limit must fill up");
    // Space returns.
    room(1_000_000).await;
    // A write alone, then a batch whose merged attempt fails (a duplicate seq) and is
    // replayed unit by unit, then a write alone again.
    let mut rows = Vec::new();
    let mut answers = Vec::new();
    let phantom = message(1_000);
    rows.push(id_of(&phantom));
    answers.push(writer.write(WriteUnit::new().insert(phantom)).await);
    writer.pause();
    let mut handles = Vec::new();
    for s in [1_001, 1_000, 1_002] {
        let row = message(s);
        rows.push(id_of(&row));
        let writer = writer.clone();
        handles.push(tokio::spawn(async move {
            writer.write(WriteUnit::new().insert(row)).await
        }));
    }
    while writer.queued() < 3 {
        tokio::task::yield_now().await;
    }
    writer.resume();
    for handle in handles {
        answers.push(handle.await.unwrap());
    }
    let last = message(1_003);
    rows.push(id_of(&last));
    answers.push(writer.write(WriteUnit::new().insert(last)).await);
    eprintln!("answers once space returned: {answers:?}");
    assert!(
        matches!(answers[2], Err(WriteError::Conflict(_))),
        "the duplicate seq fails alone: {answers:?}"
    );
    let mut missing = Vec::new();
    for (id, answer) in rows.iter().zip(&answers) {
        if answer.is_ok() && !stored_elsewhere(&db.url(), id).await {
            missing.push(id.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?} (answers {answers:?})"
    );
    assert_eq!(
        answers.iter().filter(|a| a.is_ok()).count(),
        4,
        "once space is back every good write commits: {answers:?}"
    );
    stop.cancel();
    task.join().await;
    writer_db.close().await.unwrap();
    for id in &rows[..2] {
        assert!(
            stored_elsewhere(&db.url(), id).await,
            "after the writer stopped"
        );
    }
    conn.close().await.unwrap();
}

/// PostgreSQL: the writer's connection is killed (`pg_terminate_backend`) between
/// batches and during a stream of writes. No write is acknowledged that is not
/// stored, and the writer reconnects on its own.
#[tokio::test]
async fn a_killed_postgres_connection_is_replaced_and_acknowledges_nothing_lost() {
    let (_dir, db, conn) = setup().await;
    let caremsg_tests::TestDb::Postgres { admin_url, .. } = &db else {
        conn.close().await.unwrap();
        return; // PostgreSQL only.
    };
    use sea_orm::ConnectionTrait;
    let options = caremsgd::db::DbOptions {
        url: db.url(),
        max_connections: 1,
        busy_timeout: std::time::Duration::from_secs(5),
        connect_timeout: std::time::Duration::from_secs(5),
    };
    let writer_db = caremsgd::db::connect_writer(&options).await.unwrap();
    let (writer, task, stop) = start(&writer_db);
    let admin = Database::connect(admin_url.as_str()).await.unwrap();
    let name = match &db {
        caremsg_tests::TestDb::Postgres { name, .. } => name.clone(),
        caremsg_tests::TestDb::Sqlite(_) => unreachable!(),
    };
    // Kills every backend of the test database but the test's own reading one.
    let kill = || {
        let admin = admin.clone();
        let name = name.clone();
        async move {
            admin
                .execute_unprepared(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                ))
                .await
                .unwrap();
        }
    };
    let mut rows = Vec::new();
    let mut answers = Vec::new();
    for round in 0..20_i64 {
        if round % 4 == 0 {
            kill().await;
        }
        // Eight writes in flight while, every other round, the connection is killed.
        let mut handles = Vec::new();
        for i in 0..8 {
            let row = message(1 + round * 8 + i);
            rows.push(id_of(&row));
            let writer = writer.clone();
            handles.push(tokio::spawn(async move {
                writer.write(WriteUnit::new().insert(row)).await
            }));
        }
        if round % 2 == 1 {
            kill().await;
        }
        for handle in handles {
            answers.push(handle.await.unwrap());
        }
    }
    let failed = answers.iter().filter(|a| a.is_err()).count();
    eprintln!(
        "{} writes, {} acknowledged, {failed} refused while the connection was killed",
        answers.len(),
        answers.len() - failed
    );
    for answer in answers.iter().filter_map(|a| a.as_ref().err()) {
        assert!(
            answer.is_storage(),
            "a killed connection is a storage fault: {answer:?}"
        );
    }
    let mut missing = 0;
    for (id, answer) in rows.iter().zip(&answers) {
        if answer.is_ok() && !stored_elsewhere(&db.url(), id).await {
            missing += 1;
        }
    }
    assert_eq!(missing, 0, "acknowledged but not stored");
    // The writer reconnected: a write after the last kill commits.
    kill().await;
    let mut last = Err(WriteError::Closed);
    for attempt in 0..3 {
        let row = message(10_000 + attempt);
        let id = id_of(&row);
        last = writer.write(WriteUnit::new().insert(row)).await;
        if last.is_ok() {
            assert!(stored_elsewhere(&db.url(), &id).await);
            break;
        }
    }
    assert_eq!(last, Ok(()), "the writer reconnects");
    assert_eq!(writer.storage(), caremsgd::writer::StorageHealth::Ok);
    stop.cancel();
    task.join().await;
    writer_db.close().await.unwrap();
    admin.close().await.unwrap();
    conn.close().await.unwrap();
    db.drop_database().await;
}
