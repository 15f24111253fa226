//! Durable timers: deadlines kept as rows of `timers`, so each fires exactly once even
//! when its actor was passivated or the daemon was down when it came due.
//!
//! A timer is identified by its kind and subject (unique together): the two-week
//! window of an SMS authentication session (`sms_auth_window`, the session id), the
//! unread reminder of one user for one conversation (`unread_reminder`). Its row says
//! when it is due and whether it has fired.
//!
//! - [`arm`], [`arm_if_absent`], [`cancel`] and [`fire`] build [`WriteUnit`]s, so a
//!   timer changes in the same transaction as what it belongs to (a session and its
//!   window commit together; a resend and the moved window commit together).
//! - [`fire`] marks the timer fired only if it is due and has not fired
//!   (`Expect::Exactly(1)`). Put it in the same unit as the timer's effect — or use
//!   [`fire_with`] — and the effect commits at most once, whoever fires: the actor's
//!   in-memory timer, the wake-up service, or both at once.
//! - [`due`] reads due, unfired timers in due order through the `(fired, due_at)`
//!   index.
//! - [`TimerService`] is the wake-up task: every tick (and once right at start, to
//!   catch up on deadlines that passed while the daemon was down) it reads the due
//!   rows and hands each to the [`TimerHandler`] registered for its kind. Ticks can be
//!   run by hand ([`TimerService::run_once`], [`TimerServiceHandle::tick`]), so tests
//!   drive time with a `ManualClock` and never sleep.
//! - **Subjects are structured.** Besides its key (`subject`, unique with the kind),
//!   a timer names what it is about in columns of their own ([`Names`]: patient,
//!   user, sequence), so "every timer of patient X" is an equality match
//!   ([`cancel_patient`]), never a pattern over the key.
//! - **Failure backs off.** A handler that fails (or panics) leaves its timer due
//!   later: `attempts` grows and `due_at` moves by a doubling delay
//!   ([`retry_delay`]); after [`TimerServiceOptions::max_attempts`] failures the timer
//!   is dead-lettered (`dead`, and `fired` so nothing reads it as due again), counted
//!   in `caremsg_timers_dead_total` and logged once. A timer whose subject is gone is
//!   the handlers' business: they fire it without effect.
//!
//! **Architecture Invariant:** a timer's effect commits only in a unit that also
//! contains [`fire`] for it; nothing else marks a timer fired, except the
//! dead-lettering of a timer whose handler failed too often (which has no effect)
//! and a deactivation's cancelling of its subject's timers.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use caremsg_entities::TimerKind;
use caremsg_entities::timer;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::{Expr, IntoCondition, OnConflict};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, QueryTrait,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::writer::{Expect, WriteError, WriteUnit, Writer};

/// The precondition [`fire`] names when its timer is not there to fire: already fired,
/// cancelled, or moved later than "now".
pub const FIRE_PRECONDITION: &str = "timer due and not yet fired";

/// What a timer is about, in the structured columns (see the module's documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Names<'a> {
    /// The patient.
    pub patient_id: Option<&'a str>,
    /// The user.
    pub user_id: Option<&'a str>,
    /// A message sequence number.
    pub seq: Option<i64>,
}

/// The longest delay between two tries of a failing timer.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60 * 60);

/// The delay before the next try of a timer whose handler failed `attempts` times:
/// 2 s doubled per failure, at most [`MAX_RETRY_DELAY`].
pub fn retry_delay(attempts: i32) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(20);
    Duration::from_secs(2)
        .saturating_mul(1u32 << doublings)
        .min(MAX_RETRY_DELAY)
}

/// Arms the timer `kind` for `subject` to fire at `due_at`, `now` being the time of
/// arming. If the timer exists it is re-armed: its due time moves to `due_at` and it
/// counts as not fired again (it keeps its id and creation time).
///
/// Re-arming a timer that already fired revives it as a new deadline. Units that must
/// not do that after the fact (a resend racing the window's end) carry their own
/// precondition on the state the timer guards, such as "the session is pending".
pub fn arm(kind: TimerKind, subject: &str, due_at: DateTime<Utc>, now: DateTime<Utc>) -> WriteUnit {
    arm_about(kind, subject, Names::default(), due_at, now)
}

/// [`arm`], naming what the timer is about.
pub fn arm_about(
    kind: TimerKind,
    subject: &str,
    names: Names<'_>,
    due_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> WriteUnit {
    let statement = timer::Entity::insert(new_row(kind, subject, names, due_at, now))
        .on_conflict(
            OnConflict::columns([timer::Column::Kind, timer::Column::Subject])
                .update_columns([
                    timer::Column::DueAt,
                    timer::Column::Fired,
                    timer::Column::FiredAt,
                    timer::Column::Attempts,
                    timer::Column::Dead,
                ])
                .to_owned(),
        )
        .into_query();
    WriteUnit::new().exec(statement, Expect::Exactly(1), "timer armed")
}

/// Arms the timer `kind` for `subject` at `due_at` unless it exists (fired or not);
/// an existing timer is left as it is. Cheaper than [`arm`]: the writer merges these
/// inserts across a batch.
pub fn arm_if_absent(
    kind: TimerKind,
    subject: &str,
    due_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> WriteUnit {
    arm_if_absent_about(kind, subject, Names::default(), due_at, now)
}

/// [`arm_if_absent`], naming what the timer is about.
pub fn arm_if_absent_about(
    kind: TimerKind,
    subject: &str,
    names: Names<'_>,
    due_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> WriteUnit {
    WriteUnit::new().insert_or_ignore(
        new_row(kind, subject, names, due_at, now),
        &[timer::Column::Kind, timer::Column::Subject],
    )
}

/// Removes the timer `kind` for `subject`, fired or not. Removing a timer that does
/// not exist is not an error.
pub fn cancel(kind: TimerKind, subject: &str) -> WriteUnit {
    cancel_matching(kind, timer::Column::Subject.eq(subject).into_condition())
}

/// Removes every timer `kind` that meets `condition` (on its structured columns), fired
/// or not: one statement, nothing read first.
pub fn cancel_matching(kind: TimerKind, condition: Condition) -> WriteUnit {
    let statement = timer::Entity::delete_many()
        .filter(timer::Column::Kind.eq(kind))
        .filter(condition)
        .into_query();
    WriteUnit::new().exec(statement, Expect::Any, "timer cancelled")
}

/// Marks every unfired timer about `patient_id` fired at `now`, without effect (the
/// patient or their practice was deactivated): an equality match on the structured
/// column, whatever the patient's id contains.
pub fn cancel_patient(patient_id: &str, now: DateTime<Utc>) -> WriteUnit {
    cancel_where(
        timer::Column::PatientId.eq(patient_id).into_condition(),
        now,
    )
}

/// [`cancel_patient`] for every timer whose patient meets `patients` (a condition on
/// the `patients` table, such as "of practice X").
pub fn cancel_patients_where(
    patients: sea_orm::sea_query::SelectStatement,
    now: DateTime<Utc>,
) -> WriteUnit {
    cancel_where(
        timer::Column::PatientId
            .in_subquery(patients)
            .into_condition(),
        now,
    )
}

fn cancel_where(condition: Condition, now: DateTime<Utc>) -> WriteUnit {
    let statement = timer::Entity::update_many()
        .col_expr(timer::Column::Fired, Expr::value(true))
        .col_expr(timer::Column::FiredAt, Expr::value(Some(now)))
        .filter(timer::Column::Fired.eq(false))
        .filter(condition)
        .into_query();
    WriteUnit::new().exec(statement, Expect::Any, "timers cancelled")
}

/// Marks the timer `kind` for `subject` fired at `now`. The unit fails with
/// `WriteError::Precondition(FIRE_PRECONDITION)` unless the timer exists, has not
/// fired, and is due at `now` (a re-arm that moved it later wins over a stale firer).
/// Everything else in the same unit commits only if this does, so an effect that
/// shares the unit commits exactly once.
pub fn fire(kind: TimerKind, subject: &str, now: DateTime<Utc>) -> WriteUnit {
    let statement = timer::Entity::update_many()
        .col_expr(timer::Column::Fired, Expr::value(true))
        .col_expr(timer::Column::FiredAt, Expr::value(Some(now)))
        .filter(timer::Column::Kind.eq(kind))
        .filter(timer::Column::Subject.eq(subject))
        .filter(timer::Column::Fired.eq(false))
        .filter(timer::Column::DueAt.lte(now))
        .into_query();
    WriteUnit::new().exec(statement, Expect::Exactly(1), FIRE_PRECONDITION)
}

/// What [`fire_with`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FireOutcome {
    /// The timer fired and its effect committed with it.
    Fired,
    /// The effect's own precondition no longer held (what it guards has moved on:
    /// the session was confirmed, the conversation was viewed), so the timer fired
    /// without it and will not come back.
    FiredWithoutEffect,
    /// Nothing to fire: someone fired it first, or it was cancelled or moved later.
    Skipped,
}

/// Fires the timer `kind` for `subject` together with `effect`, in one unit.
///
/// The effect's operations come first, so its leading inserts can be merged with the
/// rest of the writer's batch. If the effect fails one of its own preconditions, the
/// timer is fired alone (it no longer guards anything); any other failure leaves it
/// unfired, to be tried again on the next tick. Effects should therefore be
/// idempotent in their inserts (`insert_or_ignore` on a natural key) rather than fail
/// on a duplicate.
pub async fn fire_with(
    writer: &Writer,
    kind: TimerKind,
    subject: &str,
    now: DateTime<Utc>,
    effect: WriteUnit,
) -> Result<FireOutcome, WriteError> {
    match writer.write(effect.merge(fire(kind, subject, now))).await {
        Ok(()) => Ok(FireOutcome::Fired),
        Err(WriteError::Precondition(FIRE_PRECONDITION)) => Ok(FireOutcome::Skipped),
        Err(WriteError::Precondition(_)) => match writer.write(fire(kind, subject, now)).await {
            Ok(()) => Ok(FireOutcome::FiredWithoutEffect),
            Err(WriteError::Precondition(FIRE_PRECONDITION)) => Ok(FireOutcome::Skipped),
            Err(err) => Err(err),
        },
        Err(err) => Err(err),
    }
}

/// The timer `kind` for `subject`, if armed (fired or not).
pub async fn get(
    db: &impl ConnectionTrait,
    kind: TimerKind,
    subject: &str,
) -> Result<Option<timer::Model>, DbErr> {
    timer::Entity::find()
        .filter(timer::Column::Kind.eq(kind))
        .filter(timer::Column::Subject.eq(subject))
        .one(db)
        .await
}

/// At most `limit` timers that are due at `now` and have not fired, earliest first
/// (ties in id order).
pub async fn due(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<timer::Model>, DbErr> {
    due_after(db, now, None, limit).await
}

/// Like [`due`], but only timers after `after` in due order (keyset paging: pass the
/// last timer of the previous page).
pub async fn due_after(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    after: Option<&timer::Model>,
    limit: u64,
) -> Result<Vec<timer::Model>, DbErr> {
    let mut query = timer::Entity::find()
        .filter(timer::Column::Fired.eq(false))
        .filter(timer::Column::DueAt.lte(now));
    if let Some(last) = after {
        query = query.filter(
            Condition::any()
                .add(timer::Column::DueAt.gt(last.due_at))
                .add(
                    Condition::all()
                        .add(timer::Column::DueAt.eq(last.due_at))
                        .add(timer::Column::Id.gt(last.id.as_str())),
                ),
        );
    }
    query
        .order_by_asc(timer::Column::DueAt)
        .order_by_asc(timer::Column::Id)
        .limit(limit)
        .all(db)
        .await
}

fn new_row(
    kind: TimerKind,
    subject: &str,
    names: Names<'_>,
    due_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> timer::ActiveModel {
    timer::ActiveModel {
        id: Set(uuid::Uuid::now_v7().to_string()),
        kind: Set(kind),
        subject: Set(subject.to_owned()),
        due_at: Set(due_at),
        fired: Set(false),
        fired_at: Set(None),
        created_at: Set(now),
        patient_id: Set(names.patient_id.map(str::to_owned)),
        user_id: Set(names.user_id.map(str::to_owned)),
        seq: Set(names.seq),
        attempts: Set(0),
        dead: Set(false),
    }
}

/// Why a tick or a handler failed. Messages name timers by kind and id only.
#[derive(Debug, thiserror::Error)]
pub enum TimerError {
    /// Reading the due timers failed.
    #[error("reading due timers failed: {0}")]
    Read(#[from] DbErr),
    /// Committing a timer (with its effect) failed.
    #[error("committing a timer failed: {0}")]
    Write(#[from] WriteError),
    /// A handler could not fire its timer, for a reason of its own (no PHI).
    #[error("the timer handler failed: {0}")]
    Handler(String),
    /// The timer service is no longer running.
    #[error("the timer service has stopped")]
    Stopped,
}

/// Fires the due timers of one kind.
///
/// An implementation commits [`fire`] together with the timer's effect — usually
/// through [`fire_with`] — or hands the timer to the actor that owns its subject,
/// which does the same. The service runs up to its `concurrency` of the returned
/// futures at once, reading the next page while they run, and never dispatches one
/// timer twice in a tick.
pub trait TimerHandler: Send + Sync {
    /// Fires `timer`, which was due at `now`. Called when the timer is handed out;
    /// the future it returns owns what it needs.
    fn on_due(
        &self,
        timer: timer::Model,
        now: DateTime<Utc>,
    ) -> BoxFuture<'static, Result<FireOutcome, TimerError>>;
}

/// A [`TimerHandler`] made of a function (see [`handler_fn`]).
pub struct FnHandler<F>(F);

impl<F, Fut> TimerHandler for FnHandler<F>
where
    F: Fn(timer::Model, DateTime<Utc>) -> Fut + Send + Sync,
    Fut: Future<Output = Result<FireOutcome, TimerError>> + Send + 'static,
{
    fn on_due(
        &self,
        timer: timer::Model,
        now: DateTime<Utc>,
    ) -> BoxFuture<'static, Result<FireOutcome, TimerError>> {
        (self.0)(timer, now).boxed()
    }
}

/// A handler that calls `f` for every due timer.
pub fn handler_fn<F, Fut>(f: F) -> Arc<dyn TimerHandler>
where
    F: Fn(timer::Model, DateTime<Utc>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<FireOutcome, TimerError>> + Send + 'static,
{
    Arc::new(FnHandler(f))
}

/// How the wake-up service runs.
#[derive(Debug, Clone, Copy)]
pub struct TimerServiceOptions {
    /// Time between ticks. Deadlines are met this late at worst when no actor holds
    /// an in-memory timer for them.
    pub period: Duration,
    /// Timers read per page.
    pub page_size: u64,
    /// Handlers running at once (their writes share the writer's batches).
    pub concurrency: usize,
    /// Failures of one timer's handler before it is dead-lettered.
    pub max_attempts: i32,
}

impl Default for TimerServiceOptions {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(1),
            page_size: 500,
            concurrency: 64,
            max_attempts: 10,
        }
    }
}

/// What one tick did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tick {
    /// Due timers read.
    pub due: usize,
    /// Fired with their effect.
    pub fired: usize,
    /// Fired without their effect (it no longer applied).
    pub fired_without_effect: usize,
    /// Already fired, cancelled or moved by someone else.
    pub skipped: usize,
    /// Handlers that failed or panicked; their timers are tried again later (backed
    /// off), or dead-lettered after too many failures.
    pub failed: usize,
    /// Timers dead-lettered in this tick.
    pub dead: usize,
    /// Due timers of a kind no handler is registered for.
    pub unhandled: usize,
}

/// The wake-up service: reads due timers and hands each to its kind's handler.
pub struct TimerService {
    // Reads go straight to the pool; handlers write through the writer.
    db: DatabaseConnection,
    // "Now" for the periodic ticks.
    clock: SharedClock,
    // Who fires which kind; a kind without one is counted and left due.
    handlers: HashMap<TimerKind, Arc<dyn TimerHandler>>,
    options: TimerServiceOptions,
    // Records failures (back-off, dead letters); without one a failed timer simply
    // stays due.
    writer: Option<Writer>,
    // Counts dead letters.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Handle to a spawned [`TimerService`]: run a tick now and wait for it.
#[derive(Clone)]
pub struct TimerServiceHandle {
    // Tick requests, answered with the tick's result.
    ticks: mpsc::Sender<oneshot::Sender<Result<Tick, TimerError>>>,
}

impl TimerServiceHandle {
    /// Runs a tick at the clock's "now" (between periodic ones) and returns what it did.
    pub async fn tick(&self) -> Result<Tick, TimerError> {
        let (reply, answer) = oneshot::channel();
        self.ticks
            .send(reply)
            .await
            .map_err(|_| TimerError::Stopped)?;
        answer.await.map_err(|_| TimerError::Stopped)?
    }
}

impl TimerService {
    /// A service reading `db`, with no handlers yet.
    pub fn new(db: DatabaseConnection, clock: SharedClock, options: TimerServiceOptions) -> Self {
        Self {
            db,
            clock,
            handlers: HashMap::new(),
            options,
            writer: None,
            metrics: None,
        }
    }

    /// Records handler failures through `writer` (back-off and dead letters), counting
    /// dead letters in `metrics`.
    pub fn with_failures(mut self, writer: Writer, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.writer = Some(writer);
        self.metrics = Some(metrics);
        self
    }

    /// Registers `handler` for timers of `kind` (replacing an earlier one).
    pub fn with_handler(mut self, kind: TimerKind, handler: Arc<dyn TimerHandler>) -> Self {
        self.handlers.insert(kind, handler);
        self
    }

    /// One tick at `now`: every timer due at `now` and not fired is handed to its
    /// handler, page by page, until none is left. A timer whose handler fails is
    /// passed over until the next tick.
    ///
    /// Pages overlap: the next page is read (keyset paging needs only the previous
    /// page's last timer) while the handlers of the pages before it run, and handed
    /// out whole once fewer than `concurrency` of those are still running, so the
    /// reads of one page and the commits of the previous one proceed together.
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<Tick, TimerError> {
        let mut tick = Tick::default();
        let mut unhandled: HashMap<TimerKind, usize> = HashMap::new();
        let mut last: Option<timer::Model> = None;
        let page_size = self.options.page_size.max(1);
        let concurrency = self.options.concurrency.max(1);
        let mut running = futures::stream::FuturesUnordered::new();
        let mut failures: Vec<Failed> = Vec::new();
        let mut count =
            |tick: &mut Tick, (failed, outcome): (Failed, Option<FireOutcome>)| match outcome {
                Some(FireOutcome::Fired) => tick.fired += 1,
                Some(FireOutcome::FiredWithoutEffect) => tick.fired_without_effect += 1,
                Some(FireOutcome::Skipped) => tick.skipped += 1,
                None => {
                    tick.failed += 1;
                    failures.push(failed);
                }
            };
        loop {
            let page = due_after(&self.db, now, last.as_ref(), page_size).await?;
            let full = page.len() as u64 == page_size;
            last = page.last().cloned().or(last);
            tick.due += page.len();
            // Room first, then the whole page at once: a batching handler sees the
            // page together.
            while running.len() >= concurrency {
                if let Some(outcome) = running.next().await {
                    count(&mut tick, outcome);
                }
            }
            for timer in page {
                match self.handlers.get(&timer.kind) {
                    Some(handler) => running.push(dispatch(handler.clone(), timer, now)),
                    None => *unhandled.entry(timer.kind).or_default() += 1,
                }
            }
            if !full {
                break;
            }
        }
        while let Some(outcome) = running.next().await {
            count(&mut tick, outcome);
        }
        tick.dead = self.back_off(&failures, now).await;
        for (kind, count) in unhandled {
            tick.unhandled += count;
            tracing::warn!(
                kind = kind.as_str(),
                count,
                "Due timers have no handler; they stay due."
            );
        }
        Ok(tick)
    }

    /// Starts the service: a tick right away (catch-up after downtime), then one every
    /// `period` and whenever a [`TimerServiceHandle::tick`] asks, until `stop`.
    pub fn spawn(self, stop: CancellationToken) -> (TimerServiceHandle, JoinHandle<()>) {
        let (ticks, mut requests) = mpsc::channel::<oneshot::Sender<Result<Tick, TimerError>>>(8);
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(self.options.period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    Some(reply) = requests.recv() => {
                        let result = self.run_once(self.clock.now()).await;
                        // A caller that went away does not need the answer.
                        let _ = reply.send(result);
                    }
                    _ = interval.tick() => {
                        match self.run_once(self.clock.now()).await {
                            Ok(tick) if tick.due > 0 => tracing::debug!(
                                due = tick.due,
                                fired = tick.fired,
                                failed = tick.failed,
                                "Timer tick."
                            ),
                            Ok(_) => {}
                            Err(err) => tracing::warn!(
                                error = %err,
                                "Reading due timers failed; the next tick tries again."
                            ),
                        }
                    }
                }
            }
            tracing::info!("The timer service has stopped.");
        });
        (TimerServiceHandle { ticks }, task)
    }
}

/// A timer whose handler failed: what its back-off needs.
struct Failed {
    id: String,
    kind: &'static str,
    attempts: i32,
}

impl TimerService {
    /// Records `failures` at `now`: each timer's `attempts` grows and it is due again
    /// after [`retry_delay`], or, at `max_attempts`, it is dead-lettered (logged once,
    /// counted). Guarded by the attempts read, so a timer fired or re-armed meanwhile
    /// is left alone. Returns how many were dead-lettered.
    async fn back_off(&self, failures: &[Failed], now: DateTime<Utc>) -> usize {
        let Some(writer) = &self.writer else {
            return 0;
        };
        let mut dead = 0;
        for failed in failures {
            let attempts = failed.attempts.saturating_add(1);
            let give_up = attempts >= self.options.max_attempts.max(1);
            let mut update = timer::Entity::update_many()
                .col_expr(timer::Column::Attempts, Expr::value(attempts))
                .filter(timer::Column::Id.eq(failed.id.as_str()))
                .filter(timer::Column::Fired.eq(false))
                .filter(timer::Column::Attempts.eq(failed.attempts));
            if give_up {
                update = update
                    .col_expr(timer::Column::Dead, Expr::value(true))
                    .col_expr(timer::Column::Fired, Expr::value(true))
                    .col_expr(timer::Column::FiredAt, Expr::value(Some(now)));
            } else {
                let delay = chrono::Duration::from_std(retry_delay(attempts))
                    .unwrap_or(chrono::Duration::hours(1));
                update = update.col_expr(timer::Column::DueAt, Expr::value(now + delay));
            }
            let unit = WriteUnit::new().exec(
                update.into_query(),
                Expect::Exactly(1),
                "timer failed and not fired meanwhile",
            );
            match writer.write(unit).await {
                Ok(()) if give_up => {
                    dead += 1;
                    if let Some(metrics) = &self.metrics {
                        metrics.timer_dead(failed.kind);
                    }
                    tracing::error!(
                        kind = failed.kind,
                        timer_id = %failed.id,
                        attempts,
                        "A timer's handler failed too often; the timer is dead-lettered and will not be tried again."
                    );
                }
                Ok(()) | Err(WriteError::Precondition(_)) => {}
                Err(err) => {
                    tracing::warn!(kind = failed.kind, timer_id = %failed.id, error = %err, "Recording a timer's failure failed; it stays due.");
                }
            }
        }
        dead
    }
}

/// Runs one handler, containing its failure or panic to this timer. `None` when it
/// failed.
fn dispatch(
    handler: Arc<dyn TimerHandler>,
    timer: timer::Model,
    now: DateTime<Utc>,
) -> impl Future<Output = (Failed, Option<FireOutcome>)> {
    let kind = timer.kind.as_str();
    let id = timer.id.clone();
    let attempts = timer.attempts;
    // The handler is called now, not when the future is first polled, so that a page
    // of due timers reaches a batching handler together; a panic while it builds its
    // future is caught here, one while the future runs below.
    let run = std::panic::catch_unwind(AssertUnwindSafe(|| handler.on_due(timer, now)));
    async move {
        let outcome = match run {
            Ok(run) => AssertUnwindSafe(run).catch_unwind().await,
            Err(panic) => Err(panic),
        };
        let outcome = report(kind, &id, outcome);
        (Failed { id, kind, attempts }, outcome)
    }
}

/// The outcome of one dispatch, logged when the timer stays due.
fn report(
    kind: &'static str,
    id: &str,
    outcome: std::thread::Result<Result<FireOutcome, TimerError>>,
) -> Option<FireOutcome> {
    match outcome {
        Ok(Ok(outcome)) => Some(outcome),
        Ok(Err(err)) => {
            tracing::warn!(
                kind,
                timer_id = %id,
                error = %err,
                "A due timer could not fire; it is tried again later."
            );
            None
        }
        Err(_) => {
            tracing::error!(kind, timer_id = %id, "A timer handler panicked; the timer is tried again later.");
            None
        }
    }
}
