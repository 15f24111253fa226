//! `timers`: durable deadlines, so a deadline passed while an actor slept or the daemon was down still fires once.
//!
//! An active actor arms an in-memory timer for its rows; a wake-up service reads
//! due rows through the `(fired, due_at)` index. Marking a row fired is in the same
//! transaction as its effect.

use sea_orm::entity::prelude::*;

use crate::enums::TimerKind;

/// A deadline of kind `kind` for `subject`; at most one per (kind, subject).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "timers")]
pub struct Model {
    /// UUIDv7.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub kind: TimerKind,
    /// What the deadline is about, as one key (unique with `kind`): a session id
    /// (`sms_auth_window`) or `{patient}/{user}/{seq}` (`unread_reminder`). Queries
    /// use the structured columns below, never a pattern over this.
    pub subject: String,
    pub due_at: DateTimeUtc,
    pub fired: bool,
    pub fired_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    /// The patient the timer is about (both kinds).
    pub patient_id: Option<String>,
    /// The user the timer is about (`unread_reminder`).
    pub user_id: Option<String>,
    /// The first unviewed message of the streak (`unread_reminder`).
    pub seq: Option<i64>,
    /// Times its handler failed; each failure moves `due_at` later.
    pub attempts: i32,
    /// Given up after too many failures (the dead-letter state; `fired` is set too,
    /// so it is never read as due again).
    pub dead: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
