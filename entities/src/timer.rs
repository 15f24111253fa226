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
    /// What the deadline is about: a session id (`sms_auth_window`) or a
    /// conversation and user (`unread_reminder`).
    pub subject: String,
    pub due_at: DateTimeUtc,
    pub fired: bool,
    pub fired_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
