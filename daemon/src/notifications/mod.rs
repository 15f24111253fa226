//! Staff notifications: New Patient Message, the Unread Message Reminder and Two-Way
//! Texting, in-app and by email — each at most once per (user, kind, subject).
//!
//! The hooks build write units and do not write. Their caller merges the unit into
//! the unit of the change that causes the notifications, so a notification commits
//! with its cause or not at all:
//!
//! - [`on_patient_message`]: the ConversationActor, for a message from the patient
//!   (portal or SMS; never for staff messages). Every user in the patient's Care
//!   Team panel who is notified gets a `new_patient_message` (subject: the message
//!   id), and each of them with the reminder on has the streak's reminder timer
//!   armed ([`reminder`]).
//! - [`reminder::on_view`]: the ConversationActor, when a user's read marker moves:
//!   viewing cancels the streak's reminder.
//! - [`reminder::handler`]: the timer service, for due reminders: the notification
//!   commits in the same unit as the timer's firing.
//! - [`on_sms_status`]: the SMS authentication code, for a status change (subject:
//!   the change's id).
//!
//! After the commit the caller hands the [`Notify`] to [`Notify::publish`], which
//! pushes the in-app notifications on the event bus and wakes the email dispatcher.
//!
//! A notification is a `notifications` row, inserted or ignored on its unique
//! (user, kind, subject), so a repeat is a no-op also after a crash. Email goes out
//! as a `deliveries` row (channel `email`, purpose `notification`) through the
//! gateway `notifications.email_gateway`, rendered by [`email`], which is given the
//! practice's name, the kind and a link — never a patient's name, phone, date of birth
//! or a message's text. A user whose channels are email only still gets the row (the
//! once-only key and the delivery's parent); it is stored already read and is not
//! pushed live.
//!
//! **Architecture Invariant:** a notification row is written only in the unit of the
//! event that causes it (a patient message, a fired reminder timer, a status change).

pub mod email;
pub mod recipients;
pub mod reminder;
pub mod settings;

use std::collections::BTreeSet;
use std::sync::Arc;

use caremsg_config::Settings;
use caremsg_entities::{
    DeliveryChannel, DeliveryPurpose, DeliveryStatus, Direction, SmsStatus, delivery, message,
    notification, patient,
};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{ColumnTrait, ConnectionTrait, DbErr};

use self::recipients::Recipient;
use self::settings::Setting;
use crate::events::Event;
use crate::state::AppState;
use crate::writer::{Expect, WriteUnit};

/// The notifications one event causes: the rows to commit with it, and what to push
/// once they are committed.
#[derive(Debug, Default)]
pub struct Notify {
    // Notifications and reminder timers: plain inserts, merged by the writer.
    inserts: WriteUnit,
    // Email deliveries, inserted only if their notification row exists.
    after: WriteUnit,
    // Every notification built, with its channels.
    created: Vec<Created>,
}

/// A notification built, and where it goes.
#[derive(Debug)]
struct Created {
    row: notification::Model,
    // Shown in-app (pushed live).
    in_app: bool,
    // An email delivery was built for it.
    email: bool,
}

impl Notify {
    /// The rows to commit with the causing change (the notifications and timers
    /// first, so the writer can merge them with the rest of its batch). Take it once.
    pub fn take_unit(&mut self) -> WriteUnit {
        std::mem::take(&mut self.inserts).merge(std::mem::take(&mut self.after))
    }

    /// The notifications built.
    pub fn notifications(&self) -> impl Iterator<Item = &notification::Model> {
        self.created.iter().map(|c| &c.row)
    }

    /// How many emails were built.
    pub fn emails(&self) -> usize {
        self.created.iter().filter(|c| c.email).count()
    }

    /// Whether nothing is notified.
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.inserts.is_empty()
    }

    /// The rows to commit, as (inserts, the rest): a unit that gathers several
    /// `Notify`s puts every insert first, so the writer merges them all.
    fn take_parts(&mut self) -> (WriteUnit, WriteUnit) {
        (
            std::mem::take(&mut self.inserts),
            std::mem::take(&mut self.after),
        )
    }

    /// After the commit: pushes the in-app notifications to their users' event
    /// streams and wakes the email dispatcher.
    pub async fn publish(self, state: &AppState) {
        self.publish_with(state, Vec::new()).await;
    }

    /// After the commit: publishes `first` (the change that caused the
    /// notifications, say its message) and then the in-app notifications, together
    /// ([`Events::publish_all`](crate::events::Events::publish_all): a stream given
    /// the message and its notification writes both at once), and wakes the email
    /// dispatcher.
    pub async fn publish_with(self, state: &AppState, first: Vec<Event>) {
        let emails = self.emails();
        let mut events = first;
        for Created { row, in_app, email } in self.created {
            let kind = row.kind.as_str();
            if email {
                state.metrics.notification(kind, "email", 1);
            }
            if in_app {
                state.metrics.notification(kind, "in_app", 1);
                events.push(Event::Notification {
                    user_id: row.user_id.clone(),
                    notification: Arc::new(row),
                });
            }
        }
        state.events.publish_all(events).await;
        if emails > 0 {
            state.gateways.wake();
        }
    }

    /// Adds the notification `what` for `to` (whose setting the caller checked), with
    /// its email when the user's channels and the configuration allow.
    fn add(
        &mut self,
        config: &caremsg_config::Notifications,
        to: &Recipient,
        what: &About<'_>,
        now: DateTime<Utc>,
    ) {
        let route = settings::route(&to.prefs, what.setting, to.email.as_deref(), config);
        let kind = what.setting.kind();
        let row = notification::Model {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: to.user_id.clone(),
            patient_id: to.patient_id.clone(),
            kind,
            subject: what.subject.to_owned(),
            message_seq: what.message_seq,
            sms_status: what.sms_status,
            created_at: now,
            read_at: (!route.in_app).then_some(now),
        };
        self.inserts = std::mem::take(&mut self.inserts).insert_or_ignore(
            notification::ActiveModel::from(row.clone()),
            &[
                notification::Column::UserId,
                notification::Column::Kind,
                notification::Column::Subject,
            ],
        );
        let email = route.email.is_some();
        if let Some((gateway, address)) = route.email {
            let email = email::compose(config, &to.practice_name, kind, &to.patient_id);
            let delivery = delivery::Model {
                id: uuid::Uuid::now_v7().to_string(),
                message_id: None,
                notification_id: Some(row.id.clone()),
                patient_id: Some(to.patient_id.clone()),
                practice_id: to.practice_id.clone(),
                channel: DeliveryChannel::Email,
                purpose: DeliveryPurpose::Notification,
                gateway: Some(gateway),
                recipient: Some(address),
                from_number: None,
                subject: Some(email.subject),
                body: Some(email.body),
                status: DeliveryStatus::Queued,
                attempts: 0,
                next_attempt_at: now,
                claimed_at: None,
                provider_message_id: None,
                error_code: None,
                error_reason: None,
                created_at: now,
                updated_at: now,
            };
            self.after = std::mem::take(&mut self.after).exec(
                email_if_notified(delivery, &row.id),
                Expect::Any,
                "notification email",
            );
        }
        self.created.push(Created {
            row,
            in_app: route.in_app,
            email,
        });
    }
}

/// What a notification is about.
struct About<'a> {
    // The setting that sends it (and so its kind).
    setting: Setting,
    // At most one notification per (user, kind, subject).
    subject: &'a str,
    // The message it is about, if one.
    message_seq: Option<i64>,
    // The new SMS status (Two-Way Texting).
    sms_status: Option<SmsStatus>,
}

/// `INSERT INTO deliveries … SELECT … WHERE EXISTS (the notification)`: the email of
/// a notification that was a repeat (ignored) is not stored either.
fn email_if_notified(
    row: delivery::Model,
    notification_id: &str,
) -> sea_orm::sea_query::InsertStatement {
    use delivery::Column as C;
    let columns = [
        (C::Id, Expr::val(row.id)),
        (C::MessageId, Expr::val(row.message_id)),
        (C::NotificationId, Expr::val(row.notification_id)),
        (C::PatientId, Expr::val(row.patient_id)),
        (C::PracticeId, Expr::val(row.practice_id)),
        (C::Channel, Expr::val(row.channel.as_str())),
        (C::Purpose, Expr::val(row.purpose.as_str())),
        (C::Gateway, Expr::val(row.gateway)),
        (C::Recipient, Expr::val(row.recipient)),
        (C::FromNumber, Expr::val(row.from_number)),
        (C::Subject, Expr::val(row.subject)),
        (C::Body, Expr::val(row.body)),
        (C::Status, Expr::val(row.status.as_str())),
        (C::Attempts, Expr::val(row.attempts)),
        (C::NextAttemptAt, Expr::val(row.next_attempt_at)),
        (C::ClaimedAt, Expr::val(row.claimed_at)),
        (C::ProviderMessageId, Expr::val(row.provider_message_id)),
        (C::ErrorCode, Expr::val(row.error_code)),
        (C::ErrorReason, Expr::val(row.error_reason)),
        (C::CreatedAt, Expr::val(row.created_at)),
        (C::UpdatedAt, Expr::val(row.updated_at)),
    ];
    let (names, values): (Vec<_>, Vec<_>) = columns.into_iter().unzip();
    let exists = Query::select()
        .expr(Expr::val(1))
        .from(notification::Entity)
        .and_where(notification::Column::Id.eq(notification_id))
        .to_owned();
    let select = Query::select()
        .exprs(values)
        .and_where(Expr::exists(exists))
        .to_owned();
    let mut insert = Query::insert();
    insert.into_table(delivery::Entity).columns(names);
    // Infallible here: the select has exactly as many expressions as columns named.
    if let Err(err) = insert.select_from(select) {
        tracing::error!(error = %err, "Building a notification email failed.");
    }
    insert
}

/// The notifications of a new message from the patient (portal or SMS), `message`
/// not yet committed: a `new_patient_message` for every user in the patient's Care
/// Team panel who is notified (active, of the practice, not restricted, New Patient
/// Message on), and for each of them with the Unread Message Reminder on, the
/// reminder timer of their unread streak (armed if absent: the streak starts at the
/// oldest message from the patient they have not viewed).
///
/// Call it from the patient's ConversationActor, which orders it with the read
/// markers it moves.
pub async fn on_patient_message(
    db: &impl ConnectionTrait,
    config: &Settings,
    patient: &patient::Model,
    message: &message::Model,
) -> Result<Notify, DbErr> {
    let mut notify = Notify::default();
    if message.direction != Direction::FromPatient {
        return Ok(notify);
    }
    let patients = BTreeSet::from([patient.id.clone()]);
    let recipients = recipients::in_panels(db, &patients, None).await?;
    let now = message.created_at;
    let after = chrono::Duration::from_std(config.notifications.unread_reminder_after)
        .unwrap_or(chrono::Duration::MAX);
    for to in recipients
        .iter()
        .filter(|r| r.prefs.is_on(Setting::NewPatientMessage))
    {
        notify.add(
            &config.notifications,
            to,
            &About {
                setting: Setting::NewPatientMessage,
                subject: &message.id,
                message_seq: Some(message.seq),
                sms_status: None,
            },
            now,
        );
        if to.prefs.is_on(Setting::UnreadReminder) && to.last_read < message.seq {
            // The streak starts at the oldest stored message from the patient the
            // user has not viewed, or at this one (not yet committed).
            let start = to.streak_start.unwrap_or((message.seq, message.created_at));
            let (seq, at) = start;
            notify.inserts = std::mem::take(&mut notify.inserts).merge(reminder::arm(
                &patient.id,
                &to.user_id,
                seq,
                at.checked_add_signed(after)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC),
                now,
            ));
        }
    }
    Ok(notify)
}

/// A change of a patient's SMS authentication status, as the SMS authentication code
/// reports it to [`on_sms_status`].
#[derive(Debug, Clone)]
pub struct SmsStatusChange<'a> {
    /// The patient.
    pub patient_id: &'a str,
    /// What makes the change unique, e.g. its `sms_status_history` row id: the
    /// notification's subject (at most one per user and subject).
    pub subject: &'a str,
    /// The new status. Only `enabled`, `failed` and `opted_out` notify.
    pub status: SmsStatus,
    /// The staff user who started the authentication, if one did (none after the
    /// patient's START).
    pub started_by: Option<&'a str>,
    /// The `system` message recording the change, if any.
    pub message_seq: Option<i64>,
    /// When it changed.
    pub at: DateTime<Utc>,
}

/// The Two-Way Texting notifications of an SMS authentication status change (commit
/// the unit with the change, then [`Notify::publish`]): one `sms_status`
/// notification for every user with Two-Way Texting on who is in the patient's Care
/// Team panel or started the authentication, and may still access the patient.
pub async fn on_sms_status(
    db: &impl ConnectionTrait,
    config: &Settings,
    change: &SmsStatusChange<'_>,
) -> Result<Notify, DbErr> {
    let mut notify = Notify::default();
    if !matches!(
        change.status,
        SmsStatus::Enabled | SmsStatus::Failed | SmsStatus::OptedOut
    ) {
        return Ok(notify);
    }
    for to in recipients::for_sms_status(db, change.patient_id, change.started_by)
        .await?
        .iter()
        .filter(|r| r.prefs.is_on(Setting::TwoWayTexting))
    {
        notify.add(
            &config.notifications,
            to,
            &About {
                setting: Setting::TwoWayTexting,
                subject: change.subject,
                message_seq: change.message_seq,
                sms_status: Some(change.status),
            },
            change.at,
        );
    }
    Ok(notify)
}
