//! The Unread Message Reminder: one durable timer per (user, conversation) streak.
//!
//! - **Streak.** A user's unread streak in a conversation starts at the oldest message
//!   from the patient after the user's read marker. Its timer (kind
//!   `unread_reminder`) has the subject `"{patient_id}/{user_id}/{seq}"`, `seq` being
//!   that oldest unviewed message, and is due `notifications.unread_reminder_after`
//!   after it.
//! - **Arming** ([`arm`]) is insert-if-absent, in the unit of each patient message
//!   ([`super::on_patient_message`]): later messages of the same streak name the same
//!   subject and change nothing, so five messages in a row still make one timer, and
//!   a streak whose reminder has fired is not reminded again.
//! - **Viewing** ([`on_view`]): when the user's read marker passes the streak's start,
//!   the timer is removed in the unit that moves the marker. The next patient
//!   message starts a new streak — a new subject, hence a new timer.
//! - **Firing** ([`handler`]): the timer service hands due reminders to a batcher,
//!   which checks, per timer, that the streak is still unviewed and the user still
//!   notified with the reminder on (in the panel, active, not restricted), and
//!   commits the `unread_reminder` notifications (subject: the timer's) together with
//!   the firing of the same timers, in one unit — exactly once, whoever fires, also
//!   after a restart (the service catches up on start).
//!
//! Firing a batch marks its timers fired with one statement, the batch form of
//! [`timers::fire`] (same conditions: not fired, due at "now"), expecting every one
//! of them; if any was fired, cancelled or moved meanwhile, the batch is fired again
//! timer by timer with [`timers::fire_with`]. 100,000 reminders due at once are then
//! a few hundred units instead of 100,000 statements.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};

use caremsg_entities::{TimerKind, timer};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QueryTrait};
use tokio::sync::{mpsc, oneshot};

use super::recipients::{self, Recipient};
use super::settings::Setting;
use super::{About, Notify};
use crate::state::{AppState, Shared};
use crate::timers::{self, FireOutcome, TimerError, TimerHandler};
use crate::writer::{Expect, WriteError, WriteUnit};

/// The timer kind.
pub const KIND: TimerKind = TimerKind::UnreadReminder;

/// The precondition of a batch's firing (see the module's documentation).
const BATCH_FIRE: &str = "every reminder of the batch due and not yet fired";

/// Most due reminders taken at once.
const MAX_BATCH: usize = 2000;

/// Most reminders fired in one unit.
const CHUNK: usize = 1000;

/// Most batches firing at once.
const BATCHES_IN_FLIGHT: usize = 2;

/// The subject of the reminder of `user_id`'s streak in `patient_id`'s conversation
/// that starts at message `seq`.
pub fn subject(patient_id: &str, user_id: &str, seq: i64) -> String {
    format!("{patient_id}/{user_id}/{seq}")
}

/// The (patient, user, seq) a subject may stand for: ids may contain '/', so every
/// split is a candidate (one, for ordinary ids); the caller keeps the one whose
/// patient and user belong together.
pub fn parse(subject: &str) -> Vec<(&str, &str, i64)> {
    let Some((head, seq)) = subject.rsplit_once('/') else {
        return Vec::new();
    };
    let Ok(seq) = seq.parse::<i64>() else {
        return Vec::new();
    };
    head.match_indices('/')
        .map(|(i, _)| (&head[..i], &head[i + 1..], seq))
        .filter(|(p, u, _)| !p.is_empty() && !u.is_empty())
        .collect()
}

/// The (patient, user, seq) a reminder names: its structured columns, or — for a row
/// the migration could not split — every candidate split of its subject.
fn names(timer: &timer::Model) -> Vec<(&str, &str, i64)> {
    match (&timer.patient_id, &timer.user_id, timer.seq) {
        (Some(p), Some(u), Some(seq)) => vec![(p.as_str(), u.as_str(), seq)],
        _ => parse(&timer.subject),
    }
}

/// Arms the reminder of the streak starting at `seq`, due at `due_at`, unless that
/// streak's timer exists (armed or fired).
pub fn arm(
    patient_id: &str,
    user_id: &str,
    seq: i64,
    due_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> WriteUnit {
    let names = timers::Names {
        patient_id: Some(patient_id),
        user_id: Some(user_id),
        seq: Some(seq),
    };
    timers::arm_if_absent_about(KIND, &subject(patient_id, user_id, seq), names, due_at, now)
}

/// The unit that goes with moving `user_id`'s read marker in `patient_id`'s
/// conversation from `previous` to `up_to`: when that passes the start of the
/// user's unread streak, the streak's reminder is removed. Call it from the
/// conversation's actor, which orders it with the messages that arm reminders.
///
/// One statement, nothing read: a reminder's start is the first message from the
/// patient after the user's marker when it was armed, and markers only move forward,
/// so the user's one reminder whose start lies in `(previous, up_to]` is the
/// streak's.
pub fn on_view(patient_id: &str, user_id: &str, previous: i64, up_to: i64) -> WriteUnit {
    if up_to <= previous {
        return WriteUnit::new();
    }
    use caremsg_entities::timer::Column as C;
    timers::cancel_matching(
        KIND,
        Condition::all()
            .add(C::PatientId.eq(patient_id))
            .add(C::UserId.eq(user_id))
            .add(C::Seq.gt(previous))
            .add(C::Seq.lte(up_to)),
    )
}

/// The timer service's handler for due reminders. It queues each due timer for a
/// batcher task, which fires them in batches; the task ends when the handler is
/// dropped (with the timer service).
pub fn handler(state: &Shared) -> Arc<dyn TimerHandler> {
    let (due, queue) = mpsc::unbounded_channel();
    tokio::spawn(batcher(Arc::downgrade(state), queue));
    Arc::new(ReminderHandler { due })
}

/// One due reminder, waiting for its batch.
struct Due {
    timer: timer::Model,
    now: DateTime<Utc>,
    reply: oneshot::Sender<Result<FireOutcome, TimerError>>,
}

struct ReminderHandler {
    // To the batcher task.
    due: mpsc::UnboundedSender<Due>,
}

impl TimerHandler for ReminderHandler {
    fn on_due(
        &self,
        timer: timer::Model,
        now: DateTime<Utc>,
    ) -> BoxFuture<'static, Result<FireOutcome, TimerError>> {
        let (reply, answer) = oneshot::channel();
        let queued = self.due.send(Due { timer, now, reply }).is_ok();
        async move {
            if !queued {
                return Err(TimerError::Stopped);
            }
            answer.await.map_err(|_| {
                TimerError::Handler("the reminder batch did not complete".to_owned())
            })?
        }
        .boxed()
    }
}

/// Takes every due reminder waiting (up to [`MAX_BATCH`]) and fires them in chunks of
/// [`CHUNK`], all at once: their reads run side by side on the pool while the writer
/// commits their units together. Those that arrive meanwhile make the next batch,
/// which starts while the one before it is still committing (at most
/// [`BATCHES_IN_FLIGHT`] at a time), so one batch's reads overlap another's commit.
async fn batcher(state: Weak<AppState>, mut queue: mpsc::UnboundedReceiver<Due>) {
    let mut running = futures::stream::FuturesUnordered::new();
    let mut open = true;
    while open || !running.is_empty() {
        tokio::select! {
            Some(()) = running.next(), if !running.is_empty() => {}
            first = queue.recv(), if open && running.len() < BATCHES_IN_FLIGHT => {
                let Some(first) = first else {
                    open = false;
                    continue;
                };
                // A page of due timers arrives in a burst: take what is there, and
                // again after a yield while more keeps coming.
                let mut batch = vec![first];
                loop {
                    let before = batch.len();
                    while batch.len() < MAX_BATCH {
                        match queue.try_recv() {
                            Ok(due) => batch.push(due),
                            Err(_) => break,
                        }
                    }
                    if batch.len() == before || batch.len() >= MAX_BATCH {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                // The daemon is gone: dropping the batch answers its timers "not fired".
                let Some(state) = state.upgrade() else { break };
                running.push(fire_batches(state, batch));
            }
        }
    }
}

/// Fires one batch, chunk by chunk, all chunks at once.
async fn fire_batches(state: Arc<AppState>, batch: Vec<Due>) {
    let mut by_now: BTreeMap<DateTime<Utc>, Vec<Due>> = BTreeMap::new();
    for due in batch {
        by_now.entry(due.now).or_default().push(due);
    }
    let mut chunks = Vec::new();
    for (now, mut group) in by_now {
        while !group.is_empty() {
            let rest = group.split_off(group.len().min(CHUNK));
            chunks.push((now, std::mem::replace(&mut group, rest)));
        }
    }
    let state = &state;
    futures::future::join_all(chunks.into_iter().map(|(now, chunk)| async move {
        let size = chunk.len();
        // A panic drops the chunk's replies: its timers stay due for the next tick.
        if AssertUnwindSafe(fire_batch(state, now, chunk))
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!(
                reminders = size,
                "Firing a batch of unread reminders panicked; they stay due."
            );
        }
    }))
    .await;
}

/// The batch form of [`timers::fire`] for the reminders `ids` (primary keys of
/// `unread_reminder` timers, so the kind needs no condition of its own).
///
/// Only the ids may be indexable: SQLite, without statistics, would rather walk the
/// `(fired, due_at)` index over every due timer (`fired = false`), or the `(kind,
/// subject)` index over every reminder (`kind = ?`), than look 250 ids up —
/// quadratic when 100,000 are due. Hence `fired <> true`, which no index serves.
fn fire_all(ids: &[String], now: DateTime<Utc>) -> sea_orm::sea_query::UpdateStatement {
    timer::Entity::update_many()
        .col_expr(timer::Column::Fired, Expr::value(true))
        .col_expr(timer::Column::FiredAt, Expr::value(Some(now)))
        .filter(timer::Column::Id.is_in(ids.iter().cloned()))
        .filter(timer::Column::Fired.ne(true))
        .filter(timer::Column::DueAt.lte(now))
        .into_query()
}

/// The notification a due reminder still warrants, if any: its streak is unviewed and
/// its user notified with the reminder on.
fn effect(
    config: &caremsg_config::Notifications,
    timer: &timer::Model,
    panel: &HashMap<(&str, &str), &Recipient>,
    now: DateTime<Utc>,
) -> Notify {
    let mut notify = Notify::default();
    let found = names(timer)
        .into_iter()
        .find_map(|(p, u, seq)| panel.get(&(p, u)).map(|to| (*to, seq)));
    if let Some((to, seq)) = found
        && to.prefs.is_on(Setting::UnreadReminder)
        && to.last_read < seq
    {
        notify.add(
            config,
            to,
            &About {
                setting: Setting::UnreadReminder,
                subject: &timer.subject,
                message_seq: Some(seq),
                sms_status: None,
            },
            now,
        );
    }
    notify
}

/// Fires `group` (due at `now`) and answers each of its timers.
async fn fire_batch(state: &AppState, now: DateTime<Utc>, group: Vec<Due>) {
    // One timer once: a repeat is answered as already handled.
    let mut seen = HashSet::new();
    let mut unique = Vec::with_capacity(group.len());
    for due in group {
        if seen.insert(due.timer.id.clone()) {
            unique.push(due);
        } else {
            let _ = due.reply.send(Ok(FireOutcome::Skipped));
        }
    }
    let group = unique;
    let mut patients = BTreeSet::new();
    let mut users = BTreeSet::new();
    for due in &group {
        for (p, u, _) in names(&due.timer) {
            patients.insert(p.to_owned());
            users.insert(u.to_owned());
        }
    }
    let rows = match recipients::in_panels(&state.db, &patients, Some(&users)).await {
        Ok(rows) => rows,
        Err(err) => {
            tracing::warn!(error = %err, reminders = group.len(), "Reading reminder recipients failed; the reminders stay due.");
            for due in group {
                let _ = due.reply.send(Err(TimerError::Handler(
                    "reading reminder recipients failed".to_owned(),
                )));
            }
            return;
        }
    };
    let panel: HashMap<(&str, &str), &Recipient> = rows
        .iter()
        .map(|r| ((r.patient_id.as_str(), r.user_id.as_str()), r))
        .collect();
    let config = state.settings.load();
    let mut effects: Vec<Notify> = group
        .iter()
        .map(|due| effect(&config.notifications, &due.timer, &panel, now))
        .collect();

    let ids: Vec<String> = group.iter().map(|due| due.timer.id.clone()).collect();
    let mut inserts = WriteUnit::new();
    let mut rest = WriteUnit::new();
    let mut units = Vec::with_capacity(effects.len());
    for effect in &mut effects {
        let (i, r) = effect.take_parts();
        units.push(i.clone().merge(r.clone()));
        inserts = inserts.merge(i);
        rest = rest.merge(r);
    }
    let unit = inserts.merge(rest).exec(
        fire_all(&ids, now),
        Expect::Exactly(ids.len() as u64),
        BATCH_FIRE,
    );
    match state.writer.write(unit).await {
        Ok(()) => {
            for (due, effect) in group.into_iter().zip(effects) {
                let outcome = if effect.is_empty() {
                    FireOutcome::FiredWithoutEffect
                } else {
                    FireOutcome::Fired
                };
                effect.publish(state).await;
                let _ = due.reply.send(Ok(outcome));
            }
        }
        Err(WriteError::Precondition(BATCH_FIRE)) => {
            // Someone fired, cancelled or moved one of them: fire one by one.
            let singles =
                group
                    .into_iter()
                    .zip(effects)
                    .zip(units)
                    .map(|((due, effect), unit)| async move {
                        let had_effect = !effect.is_empty();
                        let result =
                            timers::fire_with(&state.writer, KIND, &due.timer.subject, now, unit)
                                .await
                                .map_err(TimerError::from);
                        let result = match result {
                            Ok(FireOutcome::Fired) if had_effect => {
                                effect.publish(state).await;
                                Ok(FireOutcome::Fired)
                            }
                            Ok(FireOutcome::Fired) => Ok(FireOutcome::FiredWithoutEffect),
                            other => other,
                        };
                        let _ = due.reply.send(result);
                    });
            futures::future::join_all(singles).await;
        }
        Err(err) => {
            tracing::warn!(error = %err, reminders = ids.len(), "Committing unread reminders failed; they stay due.");
            for due in group {
                let _ = due.reply.send(Err(TimerError::Write(err.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(subject: &str, expected: &[(&str, &str, i64)]) {
        assert_eq!(parse(subject), expected, "{subject}");
    }

    #[test]
    fn subjects_parse_into_every_possible_split() {
        check("pat1/u1/7", &[("pat1", "u1", 7)]);
        check(&subject("pat1", "u1", 42), &[("pat1", "u1", 42)]);
        check("a/b/c/3", &[("a", "b/c", 3), ("a/b", "c", 3)]);
        check("pat1/u1/x", &[]);
        check("pat1/7", &[]);
        check("/u1/7", &[]);
        check("", &[]);
    }
}
