//! Durable timers against a real database: a SQLite file, or a fresh PostgreSQL
//! database when `DATABASE_URL` names a PostgreSQL server. Arming, re-arming and
//! cancelling; due order; firing exactly once, also when firers race in one writer
//! batch; the wake-up service's catch-up after downtime. Time is a `ManualClock`;
//! nothing sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration as StdDuration;

use caremsg_entities::{TimerKind, audit_log, timer};
use caremsgd::audit::AuditEntry;
use caremsgd::clock::{Clock, ManualClock};
use caremsgd::metrics::Metrics;
use caremsgd::timers::{
    self, FIRE_PRECONDITION, FireOutcome, Tick, TimerError, TimerService, TimerServiceOptions,
};
use caremsgd::writer::{Expect, WriteError, WriteUnit, Writer, WriterOptions, WriterTask};
use chrono::{DateTime, Duration, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, Database, DatabaseConnection, EntityTrait, PaginatorTrait,
    QueryFilter, QueryTrait,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WINDOW: TimerKind = TimerKind::SmsAuthWindow;
const REMINDER: TimerKind = TimerKind::UnreadReminder;
/// The `audit_log.action` the test effects write.
const EFFECT: &str = "test.timer_effect";

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-02T15:00:00Z")
        .unwrap()
        .to_utc()
}

/// A fresh, migrated database and a writer on it.
struct Harness {
    db: DatabaseConnection,
    writer: Writer,
    writer_stop: CancellationToken,
    writer_task: WriterTask,
    // The writer's metrics: tests read how many batches it committed.
    metrics: Arc<Metrics>,
    clock: ManualClock,
    // A PostgreSQL test database to drop at the end: (server URL, name).
    postgres: Option<(String, String)>,
    // The SQLite file's directory, removed on drop.
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (url, postgres) = match std::env::var("DATABASE_URL") {
            Ok(server) if server.starts_with("postgres") => {
                let name = format!("caremsg_t_{}", uuid::Uuid::new_v4().simple());
                let admin = Database::connect(&server).await.unwrap();
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
                admin.close().await.unwrap();
                let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
                (format!("{base}/{name}"), Some((server.clone(), name)))
            }
            _ => (
                format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display()),
                None,
            ),
        };
        let db = caremsgd::db::connect(&caremsgd::db::DbOptions {
            url,
            max_connections: 8,
            busy_timeout: StdDuration::from_secs(10),
            connect_timeout: StdDuration::from_secs(10),
        })
        .await
        .unwrap();
        caremsgd::db::migrate(&db).await.unwrap();
        let writer_stop = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let (writer, writer_task) = Writer::start(
            db.clone(),
            WriterOptions {
                max_batch_units: 256,
                queue_depth: 256,
            },
            metrics.clone(),
            writer_stop.clone(),
        )
        .unwrap();
        Self {
            db,
            writer,
            writer_stop,
            writer_task,
            metrics,
            clock: ManualClock::new(t0()),
            postgres,
            _dir: dir,
        }
    }

    /// (batches, units) the writer has committed so far.
    fn batches(&self) -> (u64, u64) {
        let text = self.metrics.render();
        let value = |name: &str| -> u64 {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        (
            value("caremsg_writer_batch_units_count "),
            value("caremsg_writer_batch_units_sum "),
        )
    }

    async fn write(&self, unit: WriteUnit) -> Result<(), WriteError> {
        self.writer.write(unit).await
    }

    async fn get(&self, kind: TimerKind, subject: &str) -> Option<timer::Model> {
        timers::get(&self.db, kind, subject).await.unwrap()
    }

    async fn timer_rows(&self) -> u64 {
        timer::Entity::find().count(&self.db).await.unwrap()
    }

    /// How many times the effect for `subject` committed.
    async fn effects(&self, subject: &str) -> u64 {
        audit_log::Entity::find()
            .filter(audit_log::Column::Action.eq(EFFECT))
            .filter(audit_log::Column::Detail.eq(subject))
            .count(&self.db)
            .await
            .unwrap()
    }

    async fn all_effects(&self) -> u64 {
        audit_log::Entity::find()
            .filter(audit_log::Column::Action.eq(EFFECT))
            .count(&self.db)
            .await
            .unwrap()
    }

    fn service(&self, options: TimerServiceOptions) -> TimerService {
        TimerService::new(self.db.clone(), Arc::new(self.clock.clone()), options)
    }

    async fn finish(self) {
        self.writer_stop.cancel();
        self.writer_task.join().await;
        self.db.close().await.unwrap();
        if let Some((server, name)) = self.postgres {
            let admin = Database::connect(&server).await.unwrap();
            admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .unwrap();
            admin.close().await.unwrap();
        }
    }
}

/// The effect a test timer has: one audit row naming its subject.
fn effect(subject: &str, at: DateTime<Utc>) -> WriteUnit {
    AuditEntry {
        client: "timers-test",
        actor_user_id: None,
        patient_id: None,
        action: EFFECT,
        detail: Some(subject.to_owned()),
    }
    .add_to(WriteUnit::new(), at)
}

/// A handler that fires each timer with [`effect`] through `writer`.
fn effect_handler(writer: Writer) -> Arc<dyn timers::TimerHandler> {
    timers::handler_fn(move |timer: timer::Model, now| {
        let writer = writer.clone();
        async move {
            let effect = effect(&timer.subject, now);
            Ok(timers::fire_with(&writer, timer.kind, &timer.subject, now, effect).await?)
        }
    })
}

/// Options whose period never elapses within a test: ticks are run by hand.
fn manual() -> TimerServiceOptions {
    TimerServiceOptions {
        period: StdDuration::from_secs(3600),
        ..TimerServiceOptions::default()
    }
}

fn fire_refused(result: Result<(), WriteError>) {
    assert_eq!(result, Err(WriteError::Precondition(FIRE_PRECONDITION)));
}

#[tokio::test]
async fn arm_rearm_and_cancel() {
    let h = Harness::new().await;
    h.write(timers::arm(WINDOW, "s1", t0() + Duration::days(14), t0()))
        .await
        .unwrap();
    let first = h.get(WINDOW, "s1").await.unwrap();
    assert_eq!(first.due_at, t0() + Duration::days(14));
    assert!(!first.fired);
    assert_eq!(first.fired_at, None);
    assert_eq!(first.created_at, t0());

    // Re-arming moves the due time of the same timer.
    let later = t0() + Duration::hours(5);
    h.write(timers::arm(WINDOW, "s1", later + Duration::days(14), later))
        .await
        .unwrap();
    let moved = h.get(WINDOW, "s1").await.unwrap();
    assert_eq!(moved.id, first.id);
    assert_eq!(moved.due_at, later + Duration::days(14));
    assert_eq!(moved.created_at, t0());
    assert!(!moved.fired);
    assert_eq!(h.timer_rows().await, 1);

    // The same subject under another kind is another timer.
    h.write(timers::arm(
        REMINDER,
        "s1",
        t0() + Duration::hours(24),
        t0(),
    ))
    .await
    .unwrap();
    assert_eq!(h.timer_rows().await, 2);

    h.write(timers::cancel(WINDOW, "s1")).await.unwrap();
    assert_eq!(h.get(WINDOW, "s1").await, None);
    assert!(h.get(REMINDER, "s1").await.is_some());
    // Cancelling what is not there is fine.
    h.write(timers::cancel(WINDOW, "s1")).await.unwrap();
    h.write(timers::cancel(WINDOW, "never-armed"))
        .await
        .unwrap();
    assert_eq!(h.timer_rows().await, 1);
    // A cancelled timer cannot fire.
    fire_refused(
        h.write(timers::fire(WINDOW, "s1", t0() + Duration::days(30)))
            .await,
    );
    h.finish().await;
}

#[tokio::test]
async fn arm_commits_with_the_rest_of_its_unit() {
    let h = Harness::new().await;
    // A unit that fails after arming leaves no timer behind.
    let failing = timers::arm(WINDOW, "s1", t0() + Duration::days(1), t0()).exec(
        timer::Entity::update_many()
            .col_expr(timer::Column::Fired, Expr::value(false))
            .filter(timer::Column::Subject.eq("no-such-row"))
            .into_query(),
        Expect::Exactly(1),
        "session pending",
    );
    assert_eq!(
        h.write(failing).await,
        Err(WriteError::Precondition("session pending"))
    );
    assert_eq!(h.get(WINDOW, "s1").await, None);
    h.finish().await;
}

#[tokio::test]
async fn arm_if_absent_keeps_the_first_deadline() {
    let h = Harness::new().await;
    let first_due = t0() + Duration::hours(24);
    h.write(timers::arm_if_absent(REMINDER, "c1:u1", first_due, t0()))
        .await
        .unwrap();
    h.write(timers::arm_if_absent(
        REMINDER,
        "c1:u1",
        first_due + Duration::hours(3),
        t0() + Duration::hours(3),
    ))
    .await
    .unwrap();
    let timer = h.get(REMINDER, "c1:u1").await.unwrap();
    assert_eq!(timer.due_at, first_due);
    assert_eq!(timer.created_at, t0());

    // Several in one batch (merged into one statement by the writer) still keep one.
    let units: Vec<_> = (0..5)
        .map(|i| {
            let at = t0() + Duration::minutes(i);
            timers::arm_if_absent(REMINDER, "c2:u1", at + Duration::hours(24), at)
        })
        .collect();
    for result in write_in_one_batch(&h, units).await {
        result.unwrap();
    }
    assert_eq!(h.timer_rows().await, 2);

    // After firing, it stays fired: the streak it belonged to had its reminder.
    let due = h.get(REMINDER, "c2:u1").await.unwrap().due_at;
    h.write(timers::fire(REMINDER, "c2:u1", due)).await.unwrap();
    h.write(timers::arm_if_absent(
        REMINDER,
        "c2:u1",
        due + Duration::days(1),
        due,
    ))
    .await
    .unwrap();
    assert!(h.get(REMINDER, "c2:u1").await.unwrap().fired);
    h.finish().await;
}

#[tokio::test]
async fn rearming_a_fired_timer_arms_a_new_deadline() {
    let h = Harness::new().await;
    let due = t0() + Duration::hours(1);
    h.write(timers::arm(WINDOW, "s1", due, t0())).await.unwrap();
    h.write(timers::fire(WINDOW, "s1", due)).await.unwrap();
    let fired = h.get(WINDOW, "s1").await.unwrap();
    assert!(fired.fired);
    assert_eq!(fired.fired_at, Some(due));

    let next = due + Duration::days(14);
    h.write(timers::arm(WINDOW, "s1", next, due)).await.unwrap();
    let again = h.get(WINDOW, "s1").await.unwrap();
    assert_eq!(
        (again.fired, again.fired_at, again.due_at),
        (false, None, next)
    );
    assert_eq!(again.id, fired.id);
    h.write(timers::fire(WINDOW, "s1", next)).await.unwrap();
    h.finish().await;
}

#[tokio::test]
async fn due_lists_unfired_due_timers_earliest_first() {
    let h = Harness::new().await;
    let now = t0() + Duration::seconds(10);
    let ms = Duration::milliseconds;
    let arms = [
        (WINDOW, "a", t0() + Duration::seconds(3)),
        (WINDOW, "b", t0() + Duration::seconds(1)),
        (WINDOW, "c", t0() + ms(2_500)),
        (WINDOW, "future", now + ms(1)),
        (WINDOW, "fired", t0() + ms(500)),
        (REMINDER, "r", t0()),
        (REMINDER, "at-now", now),
        (WINDOW, "long-ago", t0() - Duration::days(400)),
    ];
    for (kind, subject, due) in arms {
        h.write(timers::arm(kind, subject, due, t0() - Duration::days(500)))
            .await
            .unwrap();
    }
    h.write(timers::fire(WINDOW, "fired", now)).await.unwrap();

    let subjects =
        |rows: &[timer::Model]| -> Vec<String> { rows.iter().map(|t| t.subject.clone()).collect() };
    let all = timers::due(&h.db, now, 100).await.unwrap();
    assert_eq!(subjects(&all), ["long-ago", "r", "b", "c", "a", "at-now"]);
    assert!(all.iter().all(|t| !t.fired && t.due_at <= now));

    let first_two = timers::due(&h.db, now, 2).await.unwrap();
    assert_eq!(subjects(&first_two), ["long-ago", "r"]);
    let rest = timers::due_after(&h.db, now, first_two.last(), 100)
        .await
        .unwrap();
    assert_eq!(subjects(&rest), ["b", "c", "a", "at-now"]);

    // Earlier, fewer are due; the one due a millisecond from now, a millisecond later.
    let earlier = timers::due(&h.db, t0() + Duration::seconds(2), 100)
        .await
        .unwrap();
    assert_eq!(subjects(&earlier), ["long-ago", "r", "b"]);
    let later = timers::due(&h.db, now + ms(1), 100).await.unwrap();
    assert_eq!(subjects(&later).last().map(String::as_str), Some("future"));
    h.finish().await;
}

#[tokio::test]
async fn due_pages_through_equal_due_times() {
    let h = Harness::new().await;
    for i in 0..7 {
        h.write(timers::arm(WINDOW, &format!("s{i}"), t0(), t0()))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut last: Option<timer::Model> = None;
    loop {
        let page = timers::due_after(&h.db, t0(), last.as_ref(), 3)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        seen.extend(page.iter().map(|t| t.subject.clone()));
        last = page.last().cloned();
    }
    seen.sort();
    assert_eq!(seen, ["s0", "s1", "s2", "s3", "s4", "s5", "s6"]);
    h.finish().await;
}

#[tokio::test]
async fn a_timer_fires_once_and_only_when_due() {
    let h = Harness::new().await;
    let due = t0() + Duration::minutes(1);
    h.write(timers::arm(WINDOW, "s1", due, t0())).await.unwrap();
    // Not yet due.
    fire_refused(
        h.write(timers::fire(WINDOW, "s1", due - Duration::milliseconds(1)))
            .await,
    );
    assert!(!h.get(WINDOW, "s1").await.unwrap().fired);

    h.write(effect("s1", due).merge(timers::fire(WINDOW, "s1", due)))
        .await
        .unwrap();
    let fired = h.get(WINDOW, "s1").await.unwrap();
    assert!(fired.fired);
    assert_eq!(fired.fired_at, Some(due));

    // Never again, and its effect with it.
    let later = due + Duration::days(1);
    fire_refused(
        h.write(effect("s1", later).merge(timers::fire(WINDOW, "s1", later)))
            .await,
    );
    assert_eq!(h.effects("s1").await, 1);
    assert!(timers::due(&h.db, later, 10).await.unwrap().is_empty());
    fire_refused(h.write(timers::fire(WINDOW, "unknown", later)).await);
    h.finish().await;
}

/// Queues `units` while the writer is paused, so that they all land in one batch.
async fn write_in_one_batch(h: &Harness, units: Vec<WriteUnit>) -> Vec<Result<(), WriteError>> {
    let n = units.len();
    let (batches, committed) = h.batches();
    h.writer.pause();
    let writes: Vec<_> = units
        .into_iter()
        .map(|unit| {
            let writer = h.writer.clone();
            tokio::spawn(async move { writer.write(unit).await })
        })
        .collect();
    while h.writer.queued() < n {
        tokio::task::yield_now().await;
    }
    h.writer.resume();
    let mut results = Vec::with_capacity(n);
    for write in writes {
        results.push(write.await.unwrap());
    }
    assert_eq!(
        h.batches(),
        (batches + 1, committed + n as u64),
        "not one batch"
    );
    results
}

#[tokio::test]
async fn racing_firers_in_one_batch_commit_exactly_once() {
    let h = Harness::new().await;
    h.write(timers::arm(WINDOW, "s1", t0(), t0()))
        .await
        .unwrap();
    let now = t0() + Duration::seconds(1);
    let results = write_in_one_batch(
        &h,
        vec![
            effect("s1", now).merge(timers::fire(WINDOW, "s1", now)),
            effect("s1", now).merge(timers::fire(WINDOW, "s1", now)),
        ],
    )
    .await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(results.contains(&Err(WriteError::Precondition(FIRE_PRECONDITION))));
    assert_eq!(h.effects("s1").await, 1);

    // Many firers, fire first in their units this time: still one.
    h.write(timers::arm(WINDOW, "s2", t0(), t0()))
        .await
        .unwrap();
    let units = (0..8)
        .map(|_| timers::fire(WINDOW, "s2", now).merge(effect("s2", now)))
        .collect();
    let results = write_in_one_batch(&h, units).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert_eq!(h.effects("s2").await, 1);
    h.finish().await;
}

#[tokio::test]
async fn fire_with_reports_who_fired() {
    let h = Harness::new().await;
    h.write(timers::arm(WINDOW, "s1", t0(), t0()))
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        timers::fire_with(&h.writer, WINDOW, "s1", t0(), effect("s1", t0())),
        timers::fire_with(&h.writer, WINDOW, "s1", t0(), effect("s1", t0())),
    );
    let mut outcomes = [a.unwrap(), b.unwrap()];
    outcomes.sort_by_key(|o| *o == FireOutcome::Skipped);
    assert_eq!(outcomes, [FireOutcome::Fired, FireOutcome::Skipped]);
    assert_eq!(h.effects("s1").await, 1);
    h.finish().await;
}

#[tokio::test]
async fn an_effect_that_no_longer_applies_fires_the_timer_alone() {
    let h = Harness::new().await;
    h.write(timers::arm(WINDOW, "s1", t0(), t0()))
        .await
        .unwrap();
    // The effect requires a row that is gone (a session no longer pending, say).
    let guarded = effect("s1", t0()).exec(
        timer::Entity::update_many()
            .col_expr(timer::Column::Fired, Expr::value(false))
            .filter(timer::Column::Subject.eq("session-still-pending"))
            .into_query(),
        Expect::Exactly(1),
        "session pending",
    );
    let outcome = timers::fire_with(&h.writer, WINDOW, "s1", t0(), guarded)
        .await
        .unwrap();
    assert_eq!(outcome, FireOutcome::FiredWithoutEffect);
    assert!(h.get(WINDOW, "s1").await.unwrap().fired);
    assert_eq!(h.effects("s1").await, 0);
    // And it is not due any more.
    assert!(timers::due(&h.db, t0(), 10).await.unwrap().is_empty());
    h.finish().await;
}

#[tokio::test]
async fn a_rearm_racing_the_wakeup_wins() {
    let h = Harness::new().await;
    h.write(timers::arm(WINDOW, "s1", t0(), t0()))
        .await
        .unwrap();
    let seen = timers::due(&h.db, t0(), 10).await.unwrap();
    assert_eq!(seen.len(), 1);
    // A resend moves the window after the wake-up read the row...
    h.write(timers::arm(WINDOW, "s1", t0() + Duration::days(14), t0()))
        .await
        .unwrap();
    // ...so the stale firing does nothing.
    let outcome = timers::fire_with(&h.writer, WINDOW, "s1", t0(), effect("s1", t0()))
        .await
        .unwrap();
    assert_eq!(outcome, FireOutcome::Skipped);
    let timer = h.get(WINDOW, "s1").await.unwrap();
    assert!(!timer.fired);
    assert_eq!(timer.due_at, t0() + Duration::days(14));
    assert_eq!(h.effects("s1").await, 0);
    h.finish().await;
}

#[tokio::test]
async fn run_once_fires_what_is_due_and_nothing_twice() {
    let h = Harness::new().await;
    for (subject, due) in [
        ("s1", t0() + Duration::minutes(1)),
        ("s2", t0() + Duration::minutes(2)),
        ("s3", t0() + Duration::days(1)),
    ] {
        h.write(timers::arm(WINDOW, subject, due, t0()))
            .await
            .unwrap();
    }
    let service = h
        .service(manual())
        .with_handler(WINDOW, effect_handler(h.writer.clone()));
    assert_eq!(service.run_once(t0()).await.unwrap(), Tick::default());
    let tick = service.run_once(t0() + Duration::minutes(5)).await.unwrap();
    assert_eq!((tick.due, tick.fired), (2, 2));
    let tick = service.run_once(t0() + Duration::minutes(5)).await.unwrap();
    assert_eq!(tick, Tick::default());
    let tick = service.run_once(t0() + Duration::days(2)).await.unwrap();
    assert_eq!((tick.due, tick.fired), (1, 1));
    for subject in ["s1", "s2", "s3"] {
        assert_eq!(h.effects(subject).await, 1, "{subject}");
    }
    h.finish().await;
}

#[tokio::test]
async fn catch_up_after_downtime_fires_exactly_once_on_the_first_tick() {
    let h = Harness::new().await;
    // Before the "downtime": a session's window is armed.
    h.write(timers::arm(WINDOW, "s1", t0() + Duration::days(14), t0()))
        .await
        .unwrap();
    h.write(timers::arm(WINDOW, "s2", t0() + Duration::days(30), t0()))
        .await
        .unwrap();
    // Down: no service runs while the clock passes the deadline.
    h.clock.advance(Duration::days(20));
    let restart = h.clock.now();

    let service = h
        .service(manual())
        .with_handler(WINDOW, effect_handler(h.writer.clone()));
    let tick = service.run_once(restart).await.unwrap();
    assert_eq!((tick.due, tick.fired, tick.failed), (1, 1, 0));
    assert_eq!(service.run_once(restart).await.unwrap(), Tick::default());
    assert_eq!(h.effects("s1").await, 1);
    assert_eq!(h.effects("s2").await, 0);
    let fired = h.get(WINDOW, "s1").await.unwrap();
    assert_eq!(fired.fired_at, Some(restart));
    h.finish().await;
}

#[tokio::test]
async fn the_spawned_service_catches_up_at_start_then_ticks_on_request() {
    let h = Harness::new().await;
    h.write(timers::arm(WINDOW, "s1", t0() + Duration::days(14), t0()))
        .await
        .unwrap();
    h.clock.advance(Duration::days(15));

    // The handler reports each firing, so the test waits for it instead of sleeping.
    let (fired_tx, mut fired_rx) = mpsc::unbounded_channel();
    let writer = h.writer.clone();
    let handler = timers::handler_fn(move |timer: timer::Model, now| {
        let writer = writer.clone();
        let fired_tx = fired_tx.clone();
        async move {
            let effect = effect(&timer.subject, now);
            let outcome =
                timers::fire_with(&writer, timer.kind, &timer.subject, now, effect).await?;
            let _ = fired_tx.send((timer.subject, outcome));
            Ok(outcome)
        }
    });
    let stop = CancellationToken::new();
    let (handle, task) = h
        .service(manual())
        .with_handler(WINDOW, handler)
        .spawn(stop.clone());
    assert_eq!(
        fired_rx.recv().await,
        Some(("s1".to_owned(), FireOutcome::Fired))
    );
    // A requested tick runs after the start-up one; nothing is left to fire.
    assert_eq!(handle.tick().await.unwrap(), Tick::default());
    assert_eq!(h.effects("s1").await, 1);

    // A deadline armed now fires on the next tick once the clock passes it.
    let now = h.clock.now();
    h.write(timers::arm(WINDOW, "s2", now + Duration::hours(1), now))
        .await
        .unwrap();
    assert_eq!(handle.tick().await.unwrap(), Tick::default());
    h.clock.advance(Duration::hours(1));
    let tick = handle.tick().await.unwrap();
    assert_eq!((tick.due, tick.fired), (1, 1));
    assert_eq!(
        fired_rx.recv().await,
        Some(("s2".to_owned(), FireOutcome::Fired))
    );
    assert!(fired_rx.try_recv().is_err());

    stop.cancel();
    task.await.unwrap();
    assert!(matches!(handle.tick().await, Err(TimerError::Stopped)));
    h.finish().await;
}

#[tokio::test]
async fn concurrent_ticks_fire_each_timer_once() {
    let h = Harness::new().await;
    for i in 0..40 {
        h.write(timers::arm(WINDOW, &format!("s{i}"), t0(), t0()))
            .await
            .unwrap();
    }
    let options = TimerServiceOptions {
        page_size: 7,
        concurrency: 5,
        ..manual()
    };
    let a = h
        .service(options)
        .with_handler(WINDOW, effect_handler(h.writer.clone()));
    let b = h
        .service(options)
        .with_handler(WINDOW, effect_handler(h.writer.clone()));
    let now = t0() + Duration::seconds(1);
    let (ta, tb) = tokio::join!(a.run_once(now), b.run_once(now));
    let (ta, tb) = (ta.unwrap(), tb.unwrap());
    assert_eq!(ta.fired + tb.fired, 40, "{ta:?} {tb:?}");
    assert_eq!(ta.failed + tb.failed, 0);
    assert_eq!(h.all_effects().await, 40);
    for i in 0..40 {
        assert_eq!(h.effects(&format!("s{i}")).await, 1);
    }
    h.finish().await;
}

#[tokio::test]
async fn failing_and_panicking_handlers_leave_their_timer_due_and_the_rest_fire() {
    let h = Harness::new().await;
    for subject in ["ok1", "bad", "ok2", "panic", "ok3"] {
        h.write(timers::arm(WINDOW, subject, t0(), t0()))
            .await
            .unwrap();
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let writer = h.writer.clone();
    let counter = calls.clone();
    let handler = timers::handler_fn(move |timer: timer::Model, now| {
        let writer = writer.clone();
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            match timer.subject.as_str() {
                "bad" => Err(TimerError::Handler("the gateway is down".to_owned())),
                "panic" => panic!("a bug in a handler"),
                subject => {
                    let effect = effect(subject, now);
                    Ok(timers::fire_with(&writer, timer.kind, subject, now, effect).await?)
                }
            }
        }
    });
    let options = TimerServiceOptions {
        page_size: 2,
        ..manual()
    };
    let service = h.service(options).with_handler(WINDOW, handler);
    let tick = service.run_once(t0()).await.unwrap();
    assert_eq!((tick.due, tick.fired, tick.failed), (5, 3, 2), "{tick:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    // They stay due, and are tried again on the next tick.
    let tick = service.run_once(t0()).await.unwrap();
    assert_eq!((tick.due, tick.fired, tick.failed), (2, 0, 2), "{tick:?}");
    assert_eq!(h.all_effects().await, 3);

    // The spawned service survives the panic and keeps answering.
    let stop = CancellationToken::new();
    let (handle, task) = service.spawn(stop.clone());
    let tick = handle.tick().await.unwrap();
    assert_eq!(tick.failed, 2);
    assert_eq!(handle.tick().await.unwrap().failed, 2);
    stop.cancel();
    task.await.unwrap();
    h.finish().await;
}

#[tokio::test]
async fn a_kind_without_a_handler_stays_due() {
    let h = Harness::new().await;
    h.write(timers::arm(WINDOW, "s1", t0(), t0()))
        .await
        .unwrap();
    h.write(timers::arm(REMINDER, "c1:u1", t0(), t0()))
        .await
        .unwrap();
    let service = h
        .service(manual())
        .with_handler(WINDOW, effect_handler(h.writer.clone()));
    let tick = service.run_once(t0()).await.unwrap();
    assert_eq!((tick.due, tick.fired, tick.unhandled), (2, 1, 1));
    assert!(!h.get(REMINDER, "c1:u1").await.unwrap().fired);
    let tick = service.run_once(t0()).await.unwrap();
    assert_eq!((tick.due, tick.fired, tick.unhandled), (1, 0, 1));
    h.finish().await;
}

/// Issue #13 rule 4: a timer whose handler fails backs off (attempts count, growing
/// delay) and after `max_attempts` failures is dead-lettered — counted in the
/// metrics, never retried on every tick.
#[tokio::test]
async fn a_failing_timer_backs_off_and_is_dead_lettered() {
    let h = Harness::new().await;
    h.write(timers::arm(WINDOW, "s1", t0(), t0()))
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let failing = {
        let calls = calls.clone();
        timers::handler_fn(move |_timer: timer::Model, _now| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<FireOutcome, _>(TimerError::Handler("always fails".to_owned())) }
        })
    };
    let metrics = Arc::new(Metrics::new());
    let service = h
        .service(TimerServiceOptions {
            max_attempts: 3,
            ..manual()
        })
        .with_handler(WINDOW, failing)
        .with_failures(h.writer.clone(), metrics.clone());
    let mut now = t0();
    let tick = service.run_once(now).await.unwrap();
    assert_eq!((tick.due, tick.failed, tick.dead), (1, 1, 0));
    let row = h.get(WINDOW, "s1").await.unwrap();
    assert_eq!(row.attempts, 1);
    assert_eq!(row.due_at, now + Duration::seconds(2), "first delay: 2 s");
    // Not due again within the delay: the next ticks leave it alone.
    let tick = service.run_once(now + Duration::seconds(1)).await.unwrap();
    assert_eq!(tick.due, 0);
    now += Duration::seconds(2);
    let tick = service.run_once(now).await.unwrap();
    assert_eq!((tick.due, tick.failed), (1, 1));
    let row = h.get(WINDOW, "s1").await.unwrap();
    assert_eq!(row.attempts, 2);
    assert_eq!(row.due_at, now + Duration::seconds(4), "the delay doubles");
    now += Duration::seconds(4);
    let tick = service.run_once(now).await.unwrap();
    assert_eq!((tick.due, tick.failed, tick.dead), (1, 1, 1));
    let row = h.get(WINDOW, "s1").await.unwrap();
    assert!(row.dead && row.fired, "{row:?}");
    assert_eq!(row.attempts, 3);
    // Dead: never handed out again, however late.
    let tick = service.run_once(now + Duration::days(1)).await.unwrap();
    assert_eq!(tick.due, 0);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(
        metrics
            .render()
            .contains(r#"caremsg_timers_dead_total{kind="sms_auth_window"} 1"#),
        "{}",
        metrics.render()
    );
    h.finish().await;
}

/// Issue #13 rule 5: a timer names its patient in a column of its own, so cancelling
/// one patient's timers is an equality match — `pat_1` does not reach `patX1` or
/// `PAT_1`, and ids containing '/' are no trouble.
#[tokio::test]
async fn cancelling_a_patients_timers_is_an_equality_match() {
    let h = Harness::new().await;
    let names = |patient| timers::Names {
        patient_id: Some(patient),
        user_id: Some("u/1"),
        seq: Some(3),
    };
    for patient in ["pat_1", "patX1", "PAT_1", "pat_1/u"] {
        h.write(timers::arm_if_absent_about(
            REMINDER,
            &format!("{patient}/u/1/3"),
            names(patient),
            t0(),
            t0(),
        ))
        .await
        .unwrap();
    }
    h.write(timers::cancel_patient("pat_1", t0()))
        .await
        .unwrap();
    for (patient, cancelled) in [
        ("pat_1", true),
        ("patX1", false),
        ("PAT_1", false),
        ("pat_1/u", false),
    ] {
        let row = h.get(REMINDER, &format!("{patient}/u/1/3")).await.unwrap();
        assert_eq!(row.fired, cancelled, "{patient}");
        assert_eq!(row.patient_id.as_deref(), Some(patient));
        assert_eq!(row.user_id.as_deref(), Some("u/1"));
        assert_eq!(row.seq, Some(3));
    }
    h.finish().await;
}
