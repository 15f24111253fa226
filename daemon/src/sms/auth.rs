//! SMS authentication (the 'Text Messages' button) and consent: the state machine of
//! SPEC.md, run inside the patient's `ConversationActor`.
//!
//! Every transition is one write unit: the patient's status, the session, the status
//! history, the `system` message that shows it in the conversation (with the next
//! sequence number), the texts it sends (outbox rows), the window timer and the
//! audit entry commit together or not at all. The attempt counter is committed
//! before the reply that reports it can be sent, so a crash between two wrong replies
//! never gives a fourth try.
//!
//! Why not a separate actor per session (DESIGN.md's `SmsAuthActor`): each transition
//! also appends to the conversation, whose sequence the conversation actor owns; one
//! serialiser per patient makes that a single transaction instead of a cross-actor
//! protocol. The session's deadline is a durable timer (`timers`), fired by the timer
//! service into this same actor.

use caremsg_config::Settings;
use caremsg_entities::{
    Channel, DeliveryChannel, DeliveryPurpose, DeliveryStatus, Direction, SmsAuthStatus, SmsStatus,
    SmsStatusReason, TimerKind, conversation, delivery, inbound_receipt, message, patient,
    practice, practice_sms_number, sms_auth_attempt, sms_auth_session, sms_consent,
    sms_status_history, user,
};
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QueryTrait};
use serde::Serialize;

use super::keywords::{self, Keyword};
use super::reply::{PendingReply, pending_reply};
use super::texts::{self, PracticeName, Template};
use crate::actors::conversation::{Remembered, Rows, SendError, SendMessage};
use crate::audit::AuditEntry;
use crate::events::{Event, MessageEvent, SmsStatusEvent};
use crate::phi::{Body, Phi};
use crate::state::Shared;
use crate::timers;
use crate::writer::{Expect, WriteError, WriteUnit};

/// The subject that exempts the one opt-out confirmation from the consent check at
/// claim time (the gateway dispatcher's rule).
pub use crate::gateways::outbox::OPT_OUT_CONFIRMATION_SUBJECT;

/// What staff or the patient (by text) asks of the SMS authentication.
#[derive(Debug, Clone)]
pub enum SmsOp {
    /// The 'Text Messages' button, optionally with a new mobile number.
    Start {
        /// The acting user.
        staff: user::Model,
        /// A number to store first (all or nothing).
        mobile_phone: Option<String>,
    },
    /// The same opt-in text again.
    Resend {
        /// The acting user.
        staff: user::Model,
    },
    /// 'Click here to opt patient out'.
    StaffOptOut {
        /// The acting user.
        staff: user::Model,
    },
    /// A text from this patient's number.
    Reply {
        /// The gateway instance it came through.
        gateway: String,
        /// The provider's message id.
        provider_message_id: String,
        /// The text.
        body: Body,
    },
    /// The window of session `session_id` ended (the timer service).
    Expire {
        /// The session.
        session_id: String,
    },
    /// The provider said the recipient `phone` (E.164) unsubscribed. Applies only
    /// while it is still the patient's number: one that changed in between is not
    /// the patient's to lose (the reported number itself is already opted out).
    CarrierUnsubscribed {
        /// The number the provider reported.
        phone: Phi<String>,
    },
    /// The admin sync's upsert of an existing patient whose mobile number differs from
    /// the stored one (`None`: removed). The upsert (`unit`: the admin-owned columns,
    /// programs, care team, audit entry) commits with the new number and what it does
    /// to texting, in one unit: see [`admin_number`].
    AdminNumber {
        /// The admin upsert, without the number.
        unit: AdminUnit,
        /// The new number, E.164.
        mobile_phone: Option<crate::phi::Phone>,
    },
}

/// An admin write unit carried to the patient's actor. Its `Debug` shows nothing: it
/// holds names and a date of birth.
#[derive(Clone)]
pub struct AdminUnit(pub WriteUnit);

impl std::fmt::Debug for AdminUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminUnit([redacted])")
    }
}

/// Why an SMS action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmsError {
    /// Unknown or deleted patient.
    #[error("no such patient")]
    NotFound,
    /// The practice has no SMS.
    #[error("the practice does not text")]
    SmsDisabled,
    /// The number given or stored is not a mobile number.
    #[error("{0}")]
    BadPhone(&'static str),
    /// Only the patient can opt back in (by texting START).
    #[error("the patient opted out by text")]
    PatientOptedOut,
    /// The number texted STOP.
    #[error("the number opted out")]
    NumberOptedOut,
    /// Another patient of the practice is pending or enabled on this number.
    #[error("the number is in use")]
    PhoneInUse,
    /// Resend needs a pending session.
    #[error("no pending session")]
    NotPending,
    /// Already pending on this number (use resend).
    #[error("already pending")]
    AlreadyPending,
    /// Already opted out.
    #[error("already opted out")]
    AlreadyOptedOut,
    /// Storage failed.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The storage cannot take or serve writes now, or the commit's outcome is
    /// unknown ([`WriteError::is_storage`]).
    #[error("{0}")]
    Unavailable(WriteError),
}

impl From<DbErr> for SmsError {
    fn from(err: DbErr) -> Self {
        match SendError::from(err) {
            SendError::Unavailable(err) => Self::Unavailable(err),
            other => Self::Storage(other.to_string()),
        }
    }
}

impl From<WriteError> for SmsError {
    fn from(err: WriteError) -> Self {
        match err {
            // The database's guard of one pending-or-enabled patient per number and
            // practice (the partial unique index `ux_patients_sms_number`; SQLite
            // names its columns): a concurrent start on the same number won.
            WriteError::Conflict(what)
                if what.contains("ux_patients_sms_number") || what.contains("mobile_phone") =>
            {
                Self::PhoneInUse
            }
            other if other.is_storage() => Self::Unavailable(other),
            other => Self::Storage(other.to_string()),
        }
    }
}

impl From<SendError> for SmsError {
    fn from(err: SendError) -> Self {
        match err {
            SendError::NotFound => Self::NotFound,
            SendError::Unavailable(err) => Self::Unavailable(err),
            other => Self::Storage(other.to_string()),
        }
    }
}

/// What a text from the patient turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// The provider sent it before: nothing done.
    Duplicate,
    /// Handled by the authentication (keyword, date of birth, wrong attempt).
    Handled,
    /// Stored as a conversation message: the step changed neither the patient's nor
    /// the practice's row, so its actor keeps them for the next text ([`run`]).
    Message(i64),
    /// Not for this patient after all (not pending or enabled): the caller logs it.
    NotForPatient,
    /// An admin upsert ([`SmsOp::AdminNumber`]) committed; the patient's SMS status
    /// now.
    Status(SmsStatus),
}

/// The status as `GET .../sms` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SmsView {
    /// `none`, `pending`, `enabled`, `failed`, `opted_out`.
    pub status: String,
    /// Why the last change happened, when known: `wrong_dob_3x`, `expired`,
    /// `patient_stop`, `staff_opt_out`, `carrier_unsubscribed`, `number_changed`.
    pub reason: Option<String>,
    /// Wrong replies in the current or last session.
    pub attempts: i32,
    /// The configured maximum.
    pub max_attempts: u32,
    /// When a pending session's window ends.
    pub expires_at: Option<DateTime<Utc>>,
    /// Every status change, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// One status change.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    /// The new status.
    pub status: String,
    /// Why.
    pub reason: Option<String>,
    /// When.
    pub at: DateTime<Utc>,
}

/// The SMS view of `patient`.
pub async fn view(state: &Shared, patient: &patient::Model) -> Result<SmsView, DbErr> {
    let session = latest_session(state, &patient.id).await?;
    let history = sms_status_history::Entity::find()
        .filter(sms_status_history::Column::PatientId.eq(patient.id.clone()))
        .order_by_asc(sms_status_history::Column::At)
        .order_by_asc(sms_status_history::Column::Id)
        .all(&state.db)
        .await?;
    Ok(SmsView {
        status: patient.sms_status.as_str().to_owned(),
        reason: patient.sms_status_reason.clone(),
        attempts: session.as_ref().map_or(0, |s| s.attempts),
        max_attempts: state.settings.load().sms_auth.max_attempts,
        expires_at: session
            .filter(|s| s.status == SmsAuthStatus::Pending)
            .map(|s| s.expires_at),
        history: history
            .into_iter()
            .map(|h| HistoryEntry {
                status: h.status.as_str().to_owned(),
                reason: h.reason,
                at: h.at,
            })
            .collect(),
    })
}

async fn latest_session(
    state: &Shared,
    patient_id: &str,
) -> Result<Option<sms_auth_session::Model>, DbErr> {
    sms_auth_session::Entity::find()
        .filter(sms_auth_session::Column::PatientId.eq(patient_id))
        .filter(sms_auth_session::Column::Status.ne(SmsAuthStatus::Superseded))
        .order_by_desc(sms_auth_session::Column::StartedAt)
        .order_by_desc(sms_auth_session::Column::Id)
        .one(&state.db)
        .await
}

/// The conversation's note when an automatic answer was throttled.
pub const ANSWER_THROTTLED: &str = "An automatic answer was not sent: this number has had too many automatic answers in a short time.";

/// Whether caremsg may send an automatic answer (HELP, a wrong date of birth, an
/// unknown number's HELP) to `to` through `gateway` now: the instance's
/// `auto_answers_per_sender` limit, which exists so that two auto-responders cannot
/// loop. A refusal is counted; the caller records it where the text is recorded. The
/// text that asked is stored and its keyword applied either way.
pub fn may_answer(state: &Shared, gateway: &str, to: &str) -> bool {
    let Some(instance) = state.gateways.instance(gateway) else {
        return true;
    };
    match instance.limits().check_answer(to) {
        crate::gateways::limits::Check::Allowed => true,
        crate::gateways::limits::Check::Wait(_) => {
            state.metrics.answer_throttled(gateway);
            tracing::info!(%gateway, "An automatic answer was not sent: its number is over the automatic-answer limit.");
            false
        }
    }
}

/// Whether `phone` texted STOP to `practice_id` (and not START since).
pub async fn number_opted_out(
    state: &Shared,
    practice_id: &str,
    phone: &str,
) -> Result<bool, DbErr> {
    Ok(
        sms_consent::Entity::find_by_id((practice_id.to_owned(), phone.to_owned()))
            .one(&state.db)
            .await?
            .is_some_and(|c| c.opted_out),
    )
}

/// A change being built: the unit, the conversation's sequence, what to publish after
/// the commit.
struct Change<'a> {
    state: &'a Shared,
    settings: arc_swap::Guard<std::sync::Arc<Settings>>,
    patient: patient::Model,
    practice: practice::Model,
    now: DateTime<Utc>,
    first_seq: i64,
    seq: i64,
    unit: WriteUnit,
    messages: Vec<message::Model>,
    status: Option<(SmsStatus, Option<SmsStatusReason>)>,
    // The status change's history row id and its system message (Two-Way Texting).
    change: Option<(String, i64)>,
    // Who started the authentication this change belongs to (Two-Way Texting).
    started_by: Option<String>,
}

impl<'a> Change<'a> {
    fn new(
        state: &'a Shared,
        patient: patient::Model,
        practice: practice::Model,
        seq: i64,
    ) -> Self {
        Self {
            state,
            settings: state.settings.load(),
            patient,
            practice,
            now: state.clock.now(),
            first_seq: seq,
            seq,
            unit: WriteUnit::new(),
            messages: Vec::new(),
            status: None,
            change: None,
            started_by: None,
        }
    }

    /// A `system` event in the conversation.
    fn system(&mut self, body: &str) {
        self.seq += 1;
        let message = message::Model {
            id: uuid::Uuid::now_v7().to_string(),
            patient_id: self.patient.id.clone(),
            seq: self.seq,
            direction: Direction::System,
            channel: Channel::System,
            author_user_id: None,
            body: body.to_owned(),
            client_txn_key: None,
            gateway: None,
            provider_message_id: None,
            possible_opt_out: false,
            read_by_patient_at: None,
            created_at: self.now,
        };
        self.unit =
            std::mem::take(&mut self.unit).insert(message::ActiveModel::from(message.clone()));
        self.messages.push(message);
    }

    /// The patient's new status, its history row and its system message.
    fn status(
        &mut self,
        status: SmsStatus,
        reason: Option<SmsStatusReason>,
        session: Option<&str>,
        by: Option<&str>,
        text: &str,
    ) {
        let history_id = uuid::Uuid::now_v7().to_string();
        self.unit = std::mem::take(&mut self.unit)
            .exec(
                patient::Entity::update_many()
                    .col_expr(patient::Column::SmsStatus, Expr::value(status))
                    .col_expr(
                        patient::Column::SmsStatusReason,
                        Expr::value(reason.map(|r| r.as_str().to_owned())),
                    )
                    .col_expr(patient::Column::UpdatedAt, Expr::value(self.now))
                    .filter(patient::Column::Id.eq(self.patient.id.clone()))
                    .into_query(),
                Expect::Exactly(1),
                "patient exists",
            )
            .insert(sms_status_history::ActiveModel {
                id: Set(history_id.clone()),
                patient_id: Set(self.patient.id.clone()),
                status: Set(status),
                reason: Set(reason.map(|r| r.as_str().to_owned())),
                session_id: Set(session.map(str::to_owned)),
                changed_by_user_id: Set(by.map(str::to_owned)),
                at: Set(self.now),
            });
        self.system(text);
        self.status = Some((status, reason));
        self.change = Some((history_id, self.seq));
    }

    /// An automatic answer to `to` through `gateway`, unless the number is over the
    /// automatic-answer limit ([`may_answer`]): then a `system` note says so instead.
    async fn answer(&mut self, gateway: &str, to: &str, body: String) -> Result<(), SmsError> {
        if may_answer(self.state, gateway, to) {
            self.text(to, body, None).await
        } else {
            self.system(ANSWER_THROTTLED);
            Ok(())
        }
    }

    /// An outbound text to `to` (an outbox row).
    async fn text(
        &mut self,
        to: &str,
        body: String,
        subject: Option<&str>,
    ) -> Result<(), SmsError> {
        let row = text_row(
            self.state,
            &self.practice,
            Some(&self.patient.id),
            to,
            body,
            subject,
            self.now,
        )
        .await?;
        if let Some(row) = row {
            self.unit = std::mem::take(&mut self.unit).insert(row);
        }
        Ok(())
    }

    /// A new pending session on `phone` (its window timer armed), the `pending`
    /// status with its system message, and the opt-in text. Returns the session id.
    async fn open_session(
        &mut self,
        phone: &str,
        by: Option<&str>,
        text: &str,
    ) -> Result<String, SmsError> {
        let session_id = uuid::Uuid::now_v7().to_string();
        let window = chrono::Duration::from_std(self.settings.sms_auth.window)
            .unwrap_or(chrono::Duration::days(14));
        let now = self.now;
        let expires_at = now + window;
        self.add(
            WriteUnit::new()
                .insert(sms_auth_session::ActiveModel {
                    id: Set(session_id.clone()),
                    patient_id: Set(self.patient.id.clone()),
                    practice_id: Set(self.practice.id.clone()),
                    phone: Set(phone.to_owned()),
                    status: Set(SmsAuthStatus::Pending),
                    reason: Set(None),
                    attempts: Set(0),
                    started_by_user_id: Set(by.map(str::to_owned)),
                    started_at: Set(now),
                    last_sent_at: Set(now),
                    expires_at: Set(expires_at),
                    ended_at: Set(None),
                })
                .merge(timers::arm_about(
                    TimerKind::SmsAuthWindow,
                    &session_id,
                    timers::Names {
                        patient_id: Some(&self.patient.id),
                        ..timers::Names::default()
                    },
                    expires_at,
                    now,
                )),
        );
        self.started_by = by.map(str::to_owned);
        self.status(SmsStatus::Pending, None, Some(&session_id), by, text);
        let opt_in = texts::opt_in(PracticeName::of(&self.practice));
        self.text(phone, opt_in, None).await?;
        Ok(session_id)
    }

    fn template(&self, which: Template) -> String {
        texts::render(
            &self.settings.sms_auth.templates,
            which,
            PracticeName::of(&self.practice),
        )
    }

    fn add(&mut self, unit: WriteUnit) {
        self.unit = std::mem::take(&mut self.unit).merge(unit);
    }

    /// Commits a change a staff user asked for, with its audit entry.
    async fn commit_by(
        self,
        client: &str,
        staff: &user::Model,
        action: &'static str,
    ) -> Result<i64, SmsError> {
        let patient_id = self.patient.id.clone();
        let audit = AuditEntry {
            client,
            actor_user_id: Some(&staff.id),
            patient_id: Some(&patient_id),
            action,
            detail: None,
        };
        self.commit(Some(audit)).await
    }

    /// Commits the change; returns the conversation's new last sequence number.
    async fn commit(mut self, audit: Option<AuditEntry<'_>>) -> Result<i64, SmsError> {
        if self.seq > self.first_seq {
            let guard = crate::actors::conversation::sequence_unit(
                &self.patient.id,
                self.first_seq,
                self.seq,
                self.now,
            );
            self.add(guard);
        }
        let mut unit = match audit {
            Some(audit) => audit.add_to(std::mem::take(&mut self.unit), self.now),
            None => std::mem::take(&mut self.unit),
        };
        // Two-Way Texting notifications commit with the change they report.
        let mut notify = None;
        if let (Some((history_id, seq)), Some((status, _))) = (&self.change, self.status) {
            let change = crate::notifications::SmsStatusChange {
                patient_id: &self.patient.id,
                subject: history_id,
                status,
                started_by: self.started_by.as_deref(),
                message_seq: Some(*seq),
                at: self.now,
            };
            let mut n =
                crate::notifications::on_sms_status(&self.state.db, &self.settings, &change)
                    .await?;
            unit = unit.merge(n.take_unit());
            notify = Some(n);
        }
        self.state.writer.write(unit).await?;
        let mut events = Vec::with_capacity(self.messages.len() + 1);
        for m in &self.messages {
            self.state.metrics.messages_stored.inc();
            events.push(Event::Message(std::sync::Arc::new(MessageEvent {
                patient_id: m.patient_id.clone(),
                practice_id: self.practice.id.clone(),
                seq: m.seq,
                direction: m.direction,
                channel: m.channel,
                body: Phi::new(m.body.clone()),
            })));
        }
        if let Some((status, reason)) = self.status {
            events.push(Event::SmsStatus(std::sync::Arc::new(SmsStatusEvent {
                patient_id: self.patient.id.clone(),
                practice_id: self.practice.id.clone(),
                status,
                reason: reason.map(|r| r.as_str().to_owned()),
            })));
        }
        match notify {
            Some(notify) => notify.publish_with(self.state, events).await,
            None => self.state.events.publish_all(events).await,
        }
        Ok(self.seq)
    }
}

/// The outbox row of a text from the practice's (first) SMS number to `to`; none
/// when the practice has no number.
async fn text_row(
    state: &Shared,
    practice: &practice::Model,
    patient_id: Option<&str>,
    to: &str,
    body: String,
    subject: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Option<delivery::ActiveModel>, DbErr> {
    let Some(number) = practice_sms_number::Entity::find()
        .filter(practice_sms_number::Column::PracticeId.eq(practice.id.clone()))
        .order_by_asc(practice_sms_number::Column::Number)
        .one(&state.db)
        .await?
    else {
        tracing::warn!(practice_id = %practice.id, "The practice has no SMS number; a text was not queued.");
        return Ok(None);
    };
    Ok(Some(delivery::ActiveModel::from(delivery::Model {
        id: uuid::Uuid::now_v7().to_string(),
        message_id: None,
        notification_id: None,
        patient_id: patient_id.map(str::to_owned),
        practice_id: practice.id.clone(),
        channel: DeliveryChannel::Sms,
        purpose: DeliveryPurpose::SmsAuth,
        gateway: Some(number.gateway),
        recipient: Some(to.to_owned()),
        from_number: Some(number.number),
        subject: subject.map(str::to_owned),
        body: Some(body),
        status: DeliveryStatus::Queued,
        attempts: 0,
        next_attempt_at: now,
        claimed_at: None,
        provider_message_id: None,
        error_code: None,
        error_reason: None,
        created_at: now,
        updated_at: now,
    })))
}

/// What a text from a number that is no patient's (pending or enabled) gets, beside
/// its row in the unmatched-inbound log: STOP is confirmed once and opts the number
/// out for the practice; HELP gets the help text unless the number opted out; START
/// restores a number's consent; nothing else is answered. Returns the unit and what
/// was answered.
pub async fn unmatched(
    state: &Shared,
    gateway: &str,
    practice: &practice::Model,
    from: &str,
    body: &str,
    now: DateTime<Utc>,
) -> Result<(WriteUnit, Option<&'static str>), DbErr> {
    let opted_out = number_opted_out(state, &practice.id, from).await?;
    let templates = &state.settings.load().sms_auth.templates;
    let name = PracticeName::of(practice);
    let mut unit = WriteUnit::new();
    let answered = match keywords::classify(body) {
        Some(Keyword::OptOut) if !opted_out => {
            // Guarded: of two STOPs at once, one opts the number out and is confirmed;
            // the other fails this precondition and is routed again (no answer).
            unit = unit.merge(opt_out_once(
                &practice.id,
                from,
                SmsStatusReason::PatientStop.as_str(),
                now,
            ));
            let text = texts::render(templates, Template::OptedOut, name);
            if let Some(row) = text_row(
                state,
                practice,
                None,
                from,
                text,
                Some(OPT_OUT_CONFIRMATION_SUBJECT),
                now,
            )
            .await?
            {
                unit = unit.insert(row);
            }
            Some("opt_out_confirmed")
        }
        Some(Keyword::Help) if !opted_out => {
            if may_answer(state, gateway, from) {
                let text = texts::render(templates, Template::Help, name);
                if let Some(row) = text_row(state, practice, None, from, text, None, now).await? {
                    unit = unit.insert(row);
                }
                Some("help")
            } else {
                Some("help_throttled")
            }
        }
        Some(Keyword::OptIn) if opted_out => {
            unit = unit.merge(consent(&practice.id, from, false, "patient_start", now));
            Some("opted_back_in")
        }
        _ => None,
    };
    Ok((unit, answered))
}

/// The precondition of [`opt_out_once`]: the number was not opted out when the unit
/// was built; a concurrent STOP got there first.
pub const NOT_YET_OPTED_OUT: &str = "the number is not opted out yet";

/// Opts `phone` out of `practice_id`'s texts, failing [`NOT_YET_OPTED_OUT`] unless
/// this unit is the one that changes it (a consent row is made first if none exists).
fn opt_out_once(practice_id: &str, phone: &str, reason: &str, now: DateTime<Utc>) -> WriteUnit {
    WriteUnit::new()
        .insert_or_ignore(
            sms_consent::ActiveModel {
                practice_id: Set(practice_id.to_owned()),
                phone: Set(phone.to_owned()),
                opted_out: Set(false),
                reason: Set(None),
                changed_at: Set(now),
            },
            &[sms_consent::Column::PracticeId, sms_consent::Column::Phone],
        )
        .exec(
            sms_consent::Entity::update_many()
                .col_expr(sms_consent::Column::OptedOut, Expr::value(true))
                .col_expr(sms_consent::Column::Reason, Expr::value(reason))
                .col_expr(sms_consent::Column::ChangedAt, Expr::value(now))
                .filter(sms_consent::Column::PracticeId.eq(practice_id))
                .filter(sms_consent::Column::Phone.eq(phone))
                .filter(sms_consent::Column::OptedOut.eq(false))
                .into_query(),
            Expect::Exactly(1),
            NOT_YET_OPTED_OUT,
        )
}

fn session_end(
    id: &str,
    status: SmsAuthStatus,
    reason: Option<SmsStatusReason>,
    now: DateTime<Utc>,
) -> WriteUnit {
    WriteUnit::new()
        .exec(
            sms_auth_session::Entity::update_many()
                .col_expr(sms_auth_session::Column::Status, Expr::value(status))
                .col_expr(
                    sms_auth_session::Column::Reason,
                    Expr::value(reason.map(|r| r.as_str().to_owned())),
                )
                .col_expr(sms_auth_session::Column::EndedAt, Expr::value(now))
                .filter(sms_auth_session::Column::Id.eq(id))
                .filter(sms_auth_session::Column::Status.eq(SmsAuthStatus::Pending))
                .into_query(),
            Expect::Exactly(1),
            "session pending",
        )
        .merge(timers::cancel(TimerKind::SmsAuthWindow, id))
}

fn consent(
    practice_id: &str,
    phone: &str,
    opted_out: bool,
    reason: &str,
    now: DateTime<Utc>,
) -> WriteUnit {
    WriteUnit::new().upsert(
        sms_consent::ActiveModel {
            practice_id: Set(practice_id.to_owned()),
            phone: Set(phone.to_owned()),
            opted_out: Set(opted_out),
            reason: Set(Some(reason.to_owned())),
            changed_at: Set(now),
        },
        &[sms_consent::Column::PracticeId, sms_consent::Column::Phone],
    )
}

async fn pending_session(
    state: &Shared,
    patient_id: &str,
) -> Result<Option<sms_auth_session::Model>, DbErr> {
    sms_auth_session::Entity::find()
        .filter(sms_auth_session::Column::PatientId.eq(patient_id))
        .filter(sms_auth_session::Column::Status.eq(SmsAuthStatus::Pending))
        .order_by_desc(sms_auth_session::Column::StartedAt)
        .one(&state.db)
        .await
}

/// What an SMS step leaves its actor knowing.
#[derive(Debug)]
pub struct Ran {
    /// The conversation's newest sequence number, when known.
    pub last_seq: Option<i64>,
    /// The rows the step used, when it left them as they were: only a conversation
    /// text from an enabled patient changes neither row; every other step may.
    pub rows: Option<Remembered>,
    /// What the step did.
    pub result: Result<ReplyOutcome, SmsError>,
}

/// Runs `op` for `patient_id`, whose conversation's newest sequence number is
/// `last_seq` (read from the database when unknown). A patient's text uses the rows
/// the actor `remembered` when no admin request has written since they were read;
/// every other step reads them (the actor is the only other writer of the patient's
/// row, and every step but a conversation text may change it).
pub async fn run(
    state: &Shared,
    patient_id: &str,
    last_seq: Option<i64>,
    remembered: Option<Remembered>,
    client: &str,
    op: SmsOp,
) -> Ran {
    match try_run(state, patient_id, last_seq, remembered, client, op).await {
        Ok((seq, outcome, rows)) => Ran {
            last_seq: Some(seq),
            rows,
            result: Ok(outcome),
        },
        Err(err) => Ran {
            last_seq: None,
            rows: None,
            result: Err(err),
        },
    }
}

/// `known`, or the conversation's newest sequence number read from the database.
async fn last_seq_of(
    state: &Shared,
    patient_id: &str,
    known: Option<i64>,
) -> Result<i64, SmsError> {
    match known {
        Some(seq) => Ok(seq),
        None => Ok(conversation::Entity::find_by_id(patient_id.to_owned())
            .one(&state.db)
            .await?
            .ok_or(SmsError::NotFound)?
            .last_seq),
    }
}

async fn try_run(
    state: &Shared,
    patient_id: &str,
    last_seq: Option<i64>,
    remembered: Option<Remembered>,
    client: &str,
    op: SmsOp,
) -> Result<(i64, ReplyOutcome, Option<Remembered>), SmsError> {
    // The admin upsert also reactivates a deactivated patient: it reads its own rows.
    let op = match op {
        SmsOp::AdminNumber { unit, mobile_phone } => {
            let mobile_phone = mobile_phone.map(Phi::into_inner);
            let (seq, outcome) =
                admin_number(state, patient_id, last_seq, unit.0, mobile_phone).await?;
            return Ok((seq, outcome, None));
        }
        op => op,
    };
    // Taken before the read: rows read under an older generation are not used.
    let generation = state.users.generation();
    let remembered = remembered
        .filter(|_| matches!(op, SmsOp::Reply { .. }))
        .and_then(|remembered| remembered.current(generation));
    let (patient, practice) = match remembered {
        Some(rows) => (rows.patient, rows.practice),
        // Both active, in one read.
        None => crate::access::active_patient(&state.db, patient_id)
            .await?
            .ok_or(SmsError::NotFound)?,
    };
    let seq = last_seq_of(state, patient_id, last_seq).await?;
    // A text that turns out a conversation message leaves both rows as they are: the
    // actor keeps them for its next text.
    let unchanged =
        matches!(op, SmsOp::Reply { .. }).then(|| Rows::of(patient.clone(), practice.clone()));
    let (seq, outcome) = match op {
        SmsOp::Start {
            staff,
            mobile_phone,
        } => start(state, patient, practice, seq, client, &staff, mobile_phone).await,
        SmsOp::Resend { staff } => resend(state, patient, practice, seq, client, &staff).await,
        SmsOp::StaffOptOut { staff } => {
            staff_opt_out(state, patient, practice, seq, client, &staff).await
        }
        SmsOp::Reply {
            gateway,
            provider_message_id,
            body,
        } => {
            reply(
                state,
                patient,
                practice,
                seq,
                &gateway,
                &provider_message_id,
                body,
            )
            .await
        }
        SmsOp::Expire { session_id } => expire(state, patient, practice, seq, &session_id).await,
        SmsOp::CarrierUnsubscribed { phone } => {
            carrier_unsubscribed(state, patient, practice, seq, phone.expose()).await
        }
        SmsOp::AdminNumber { .. } => Err(SmsError::Storage(
            "an admin upsert reached the SMS dispatch".into(),
        )),
    }?;
    let kept = unchanged
        .filter(|_| matches!(outcome, ReplyOutcome::Message(_)))
        .map(|rows| Remembered::new(rows, generation));
    Ok((seq, outcome, kept))
}

/// What the conversation says when a new number turns texting off.
pub const NUMBER_CHANGED_TEXT: &str = "Text messaging turned off: the mobile number changed; start text messaging again to confirm the new number.";
/// What the conversation says when a removed number turns texting off.
pub const NUMBER_REMOVED_TEXT: &str = "Text messaging turned off: the mobile number was removed.";

/// The admin upsert `unit` of a patient whose number the platform changed to
/// `mobile_phone`, with what the change does, in one unit. Consent and the confirmed
/// date of birth belong to the number, and the new one has confirmed nothing: a
/// `pending`, `enabled` or `failed` status, and an opt-out by the old number (STOP,
/// the carrier), go back to `none` (reason `number_changed`; the old number's consent
/// row stays), with the status history and a `system` message; a staff opt-out is
/// about the patient and stays. A pending session ends (superseded, its window
/// timer cancelled), and texts still queued for the patient are refused (the opt-out
/// confirmation excepted), so nothing more goes to the old number; nothing is sent to
/// the new one. When the stored number already is `mobile_phone` (another write set it
/// since the caller read it), the unit commits alone.
async fn admin_number(
    state: &Shared,
    patient_id: &str,
    last_seq: Option<i64>,
    unit: WriteUnit,
    mobile_phone: Option<String>,
) -> Result<(i64, ReplyOutcome), SmsError> {
    let patient = patient::Entity::find_by_id(patient_id.to_owned())
        .one(&state.db)
        .await?
        .ok_or(SmsError::NotFound)?;
    let seq = last_seq_of(state, patient_id, last_seq).await?;
    if patient.mobile_phone == mobile_phone {
        state.writer.write(unit).await?;
        return Ok((seq, ReplyOutcome::Status(patient.sms_status)));
    }
    let practice = practice::Entity::find_by_id(patient.practice_id.clone())
        .one(&state.db)
        .await?
        .ok_or(SmsError::NotFound)?;
    let pending = pending_session(state, &patient.id).await?;
    let reset = match patient.sms_status {
        SmsStatus::None => false,
        SmsStatus::OptedOut => {
            patient.sms_status_reason.as_deref() != Some(SmsStatusReason::StaffOptOut.as_str())
        }
        SmsStatus::Pending | SmsStatus::Enabled | SmsStatus::Failed => true,
    };
    let mut change = Change::new(state, patient, practice, seq);
    let now = change.now;
    change.add(unit);
    if let Some(session) = &pending {
        change.add(session_end(
            &session.id,
            SmsAuthStatus::Superseded,
            Some(SmsStatusReason::NumberChanged),
            now,
        ));
    }
    if reset {
        let text = if mobile_phone.is_some() {
            NUMBER_CHANGED_TEXT
        } else {
            NUMBER_REMOVED_TEXT
        };
        change.status(
            SmsStatus::None,
            Some(SmsStatusReason::NumberChanged),
            pending.as_ref().map(|s| s.id.as_str()),
            None,
            text,
        );
    }
    // After the status: the database never sees the new number pending or enabled
    // (`ux_patients_sms_number`).
    change.add(
        WriteUnit::new()
            .exec(
                patient::Entity::update_many()
                    .col_expr(patient::Column::MobilePhone, Expr::value(mobile_phone))
                    .filter(patient::Column::Id.eq(change.patient.id.clone()))
                    .into_query(),
                Expect::Exactly(1),
                "patient exists",
            )
            .exec(
                delivery::Entity::update_many()
                    .col_expr(
                        delivery::Column::Status,
                        Expr::value(DeliveryStatus::Refused),
                    )
                    .col_expr(delivery::Column::ErrorCode, Expr::value("number_changed"))
                    .col_expr(
                        delivery::Column::ErrorReason,
                        Expr::value("the mobile number changed"),
                    )
                    .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
                    .filter(delivery::Column::PatientId.eq(change.patient.id.clone()))
                    .filter(delivery::Column::Channel.eq(DeliveryChannel::Sms))
                    .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
                    .filter(
                        sea_orm::Condition::any()
                            .add(delivery::Column::Subject.is_null())
                            .add(delivery::Column::Subject.ne(OPT_OUT_CONFIRMATION_SUBJECT)),
                    )
                    .into_query(),
                Expect::Any,
                "queued texts refused",
            ),
    );
    let status = change
        .status
        .map_or(change.patient.sms_status, |(status, _)| status);
    Ok((change.commit(None).await?, ReplyOutcome::Status(status)))
}

async fn start(
    state: &Shared,
    patient: patient::Model,
    practice: practice::Model,
    seq: i64,
    client: &str,
    staff: &user::Model,
    mobile_phone: Option<String>,
) -> Result<(i64, ReplyOutcome), SmsError> {
    if !practice.sms_enabled {
        return Err(SmsError::SmsDisabled);
    }
    let region = crate::phone::country(&practice.country)
        .ok_or(SmsError::BadPhone("The practice's country is unknown."))?;
    let phone = match mobile_phone
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        Some(raw) => crate::phone::parse_mobile(raw, region)
            .map_err(|_| {
                SmsError::BadPhone("Must be a valid mobile number that can receive texts.")
            })?
            .into_inner(),
        None => patient
            .mobile_phone
            .clone()
            .ok_or(SmsError::BadPhone("The patient has no mobile number."))?,
    };
    let pending = pending_session(state, &patient.id).await?;
    if patient.sms_status == SmsStatus::OptedOut
        && patient.sms_status_reason.as_deref() != Some(SmsStatusReason::StaffOptOut.as_str())
    {
        return Err(SmsError::PatientOptedOut);
    }
    if pending.as_ref().is_some_and(|s| s.phone == phone) {
        return Err(SmsError::AlreadyPending);
    }
    if number_opted_out(state, &practice.id, &phone).await? {
        return Err(SmsError::NumberOptedOut);
    }
    let in_use = patient::Entity::find()
        .filter(patient::Column::PracticeId.eq(practice.id.clone()))
        .filter(patient::Column::MobilePhone.eq(phone.clone()))
        .filter(patient::Column::Active.eq(true))
        .filter(patient::Column::Id.ne(patient.id.clone()))
        .filter(patient::Column::SmsStatus.is_in([SmsStatus::Pending, SmsStatus::Enabled]))
        .one(&state.db)
        .await?;
    if in_use.is_some() {
        return Err(SmsError::PhoneInUse);
    }
    let mut change = Change::new(state, patient, practice, seq);
    change.started_by = Some(staff.id.clone());
    if let Some(old) = &pending {
        change.add(session_end(
            &old.id,
            SmsAuthStatus::Superseded,
            None,
            change.now,
        ));
    }
    change.add(
        WriteUnit::new().exec(
            patient::Entity::update_many()
                .col_expr(patient::Column::MobilePhone, Expr::value(phone.clone()))
                .filter(patient::Column::Id.eq(change.patient.id.clone()))
                .into_query(),
            Expect::Exactly(1),
            "patient exists",
        ),
    );
    change
        .open_session(
            &phone,
            Some(&staff.id),
            "Text messaging requested; waiting for the patient to confirm their date of birth.",
        )
        .await?;
    Ok((
        change.commit_by(client, staff, "sms.start").await?,
        ReplyOutcome::Handled,
    ))
}

async fn resend(
    state: &Shared,
    patient: patient::Model,
    practice: practice::Model,
    seq: i64,
    client: &str,
    staff: &user::Model,
) -> Result<(i64, ReplyOutcome), SmsError> {
    if !practice.sms_enabled {
        return Err(SmsError::SmsDisabled);
    }
    let session = pending_session(state, &patient.id)
        .await?
        .ok_or(SmsError::NotPending)?;
    if number_opted_out(state, &practice.id, &session.phone).await? {
        return Err(SmsError::NumberOptedOut);
    }
    let mut change = Change::new(state, patient, practice, seq);
    let now = change.now;
    let window = chrono::Duration::from_std(change.settings.sms_auth.window)
        .unwrap_or(chrono::Duration::days(14));
    let expires_at = now + window;
    change.add(
        WriteUnit::new()
            .exec(
                sms_auth_session::Entity::update_many()
                    .col_expr(sms_auth_session::Column::LastSentAt, Expr::value(now))
                    .col_expr(sms_auth_session::Column::ExpiresAt, Expr::value(expires_at))
                    .filter(sms_auth_session::Column::Id.eq(session.id.clone()))
                    .filter(sms_auth_session::Column::Status.eq(SmsAuthStatus::Pending))
                    .into_query(),
                Expect::Exactly(1),
                "session pending",
            )
            .merge(timers::arm_about(
                TimerKind::SmsAuthWindow,
                &session.id,
                timers::Names {
                    patient_id: Some(&session.patient_id),
                    ..timers::Names::default()
                },
                expires_at,
                now,
            )),
    );
    let text = texts::opt_in(PracticeName::of(&change.practice));
    change.text(&session.phone, text, None).await?;
    Ok((
        change.commit_by(client, staff, "sms.resend").await?,
        ReplyOutcome::Handled,
    ))
}

async fn staff_opt_out(
    state: &Shared,
    patient: patient::Model,
    practice: practice::Model,
    seq: i64,
    client: &str,
    staff: &user::Model,
) -> Result<(i64, ReplyOutcome), SmsError> {
    if !practice.sms_enabled {
        return Err(SmsError::SmsDisabled);
    }
    if patient.sms_status == SmsStatus::OptedOut {
        return Err(SmsError::AlreadyOptedOut);
    }
    let pending = pending_session(state, &patient.id).await?;
    let mut change = Change::new(state, patient, practice, seq);
    change.started_by = pending.as_ref().and_then(|s| s.started_by_user_id.clone());
    if let Some(session) = &pending {
        change.add(session_end(
            &session.id,
            SmsAuthStatus::OptedOut,
            Some(SmsStatusReason::StaffOptOut),
            change.now,
        ));
    }
    change.status(
        SmsStatus::OptedOut,
        Some(SmsStatusReason::StaffOptOut),
        pending.as_ref().map(|s| s.id.as_str()),
        Some(&staff.id),
        "Patient opted out of text messages by staff.",
    );
    Ok((
        change.commit_by(client, staff, "sms.staff_opt_out").await?,
        ReplyOutcome::Handled,
    ))
}

async fn expire(
    state: &Shared,
    patient: patient::Model,
    practice: practice::Model,
    seq: i64,
    session_id: &str,
) -> Result<(i64, ReplyOutcome), SmsError> {
    let now = state.clock.now();
    let session = sms_auth_session::Entity::find_by_id(session_id.to_owned())
        .one(&state.db)
        .await?;
    let Some(session) =
        session.filter(|s| s.status == SmsAuthStatus::Pending && s.expires_at <= now)
    else {
        // Ended or moved later (a resend): the timer fires alone, or waits.
        return Ok((seq, ReplyOutcome::NotForPatient));
    };
    let mut change = Change::new(state, patient, practice, seq);
    change.started_by = session.started_by_user_id.clone();
    change.add(
        WriteUnit::new()
            .exec(
                sms_auth_session::Entity::update_many()
                    .col_expr(
                        sms_auth_session::Column::Status,
                        Expr::value(SmsAuthStatus::Failed),
                    )
                    .col_expr(
                        sms_auth_session::Column::Reason,
                        Expr::value(SmsStatusReason::Expired.as_str()),
                    )
                    .col_expr(sms_auth_session::Column::EndedAt, Expr::value(now))
                    .filter(sms_auth_session::Column::Id.eq(session.id.clone()))
                    .filter(sms_auth_session::Column::Status.eq(SmsAuthStatus::Pending))
                    .into_query(),
                Expect::Exactly(1),
                "session pending",
            )
            .merge(timers::fire(TimerKind::SmsAuthWindow, &session.id, now)),
    );
    change.status(
        SmsStatus::Failed,
        Some(SmsStatusReason::Expired),
        Some(&session.id),
        None,
        "Text messaging failed: the patient did not confirm within the time allowed.",
    );
    Ok((change.commit(None).await?, ReplyOutcome::Handled))
}

async fn carrier_unsubscribed(
    state: &Shared,
    patient: patient::Model,
    practice: practice::Model,
    seq: i64,
    reported: &str,
) -> Result<(i64, ReplyOutcome), SmsError> {
    let Some(phone) = patient
        .mobile_phone
        .clone()
        .filter(|phone| phone == reported)
    else {
        return Ok((seq, ReplyOutcome::NotForPatient));
    };
    if patient.sms_status == SmsStatus::OptedOut {
        return Ok((seq, ReplyOutcome::Handled));
    }
    let pending = pending_session(state, &patient.id).await?;
    let mut change = Change::new(state, patient, practice, seq);
    change.started_by = pending.as_ref().and_then(|s| s.started_by_user_id.clone());
    let now = change.now;
    change.add(consent(
        &change.practice.id,
        &phone,
        true,
        SmsStatusReason::CarrierUnsubscribed.as_str(),
        now,
    ));
    if let Some(session) = &pending {
        change.add(session_end(
            &session.id,
            SmsAuthStatus::OptedOut,
            Some(SmsStatusReason::CarrierUnsubscribed),
            now,
        ));
    }
    change.status(
        SmsStatus::OptedOut,
        Some(SmsStatusReason::CarrierUnsubscribed),
        pending.as_ref().map(|s| s.id.as_str()),
        None,
        "Patient opted out: the carrier reports the number unsubscribed.",
    );
    Ok((change.commit(None).await?, ReplyOutcome::Handled))
}

/// A text from the patient's number.
async fn reply(
    state: &Shared,
    patient: patient::Model,
    practice: practice::Model,
    seq: i64,
    gateway: &str,
    provider_message_id: &str,
    body: Body,
) -> Result<(i64, ReplyOutcome), SmsError> {
    let Some(phone) = patient.mobile_phone.clone() else {
        return Ok((seq, ReplyOutcome::NotForPatient));
    };
    let keyword = keywords::classify(body.expose());
    // The common text: a conversation message from an enabled patient, which no
    // session or consent row can change. A provider's retry is not looked for first:
    // the message's receipt refuses it, and only then is it looked up.
    if keyword.is_none() && patient.sms_status == SmsStatus::Enabled {
        return conversation_text(
            state,
            patient,
            practice,
            seq,
            gateway,
            provider_message_id,
            body,
        )
        .await;
    }
    if crate::gateways::inbound::seen(state, gateway, provider_message_id).await? {
        return Ok((seq, ReplyOutcome::Duplicate));
    }
    let pending = pending_session(state, &patient.id).await?;
    let opted_out_number = number_opted_out(state, &practice.id, &phone).await?;
    let mut change = Change::new(state, patient, practice, seq);
    // A patient's START is started by nobody; everything else belongs to the session.
    change.started_by = pending.as_ref().and_then(|s| s.started_by_user_id.clone());
    let now = change.now;
    let receipt = |outcome: &str| {
        WriteUnit::new().insert(inbound_receipt::ActiveModel {
            gateway: Set(gateway.to_owned()),
            provider_message_id: Set(provider_message_id.to_owned()),
            received_at: Set(now),
            outcome: Set(outcome.to_owned()),
        })
    };
    match keyword {
        Some(Keyword::OptOut) => {
            change.add(receipt("opt_out"));
            change.system("Patient texted an opt-out keyword.");
            if opted_out_number && change.patient.sms_status == SmsStatus::OptedOut {
                // A repeated STOP gets no answer.
                return Ok((change.commit(None).await?, ReplyOutcome::Handled));
            }
            change.add(consent(
                &change.practice.id,
                &phone,
                true,
                SmsStatusReason::PatientStop.as_str(),
                now,
            ));
            if let Some(session) = &pending {
                change.add(session_end(
                    &session.id,
                    SmsAuthStatus::OptedOut,
                    Some(SmsStatusReason::PatientStop),
                    now,
                ));
            }
            change.status(
                SmsStatus::OptedOut,
                Some(SmsStatusReason::PatientStop),
                pending.as_ref().map(|s| s.id.as_str()),
                None,
                "Patient opted out by text.",
            );
            if !opted_out_number {
                let text = change.template(Template::OptedOut);
                change
                    .text(&phone, text, Some(OPT_OUT_CONFIRMATION_SUBJECT))
                    .await?;
            }
            Ok((change.commit(None).await?, ReplyOutcome::Handled))
        }
        Some(Keyword::Help) => {
            change.add(receipt("help"));
            change.system("Patient texted HELP.");
            if !opted_out_number {
                let text = change.template(Template::Help);
                change.answer(gateway, &phone, text).await?;
            }
            Ok((change.commit(None).await?, ReplyOutcome::Handled))
        }
        Some(Keyword::OptIn)
            if opted_out_number || change.patient.sms_status == SmsStatus::OptedOut =>
        {
            change.started_by = None;
            change.add(receipt("opt_in"));
            change.system("Patient texted to opt back in.");
            change.add(consent(
                &change.practice.id,
                &phone,
                false,
                "patient_start",
                now,
            ));
            change
                .open_session(
                    &phone,
                    None,
                    "Text messaging requested by the patient; waiting for the patient to confirm their date of birth.",
                )
                .await?;
            Ok((change.commit(None).await?, ReplyOutcome::Handled))
        }
        _ => match (&pending, change.patient.sms_status) {
            (Some(session), SmsStatus::Pending) => {
                let session = session.clone();
                let receipt = receipt("auth_reply");
                dob_reply(change, session, gateway, &phone, body, receipt).await
            }
            (_, SmsStatus::Enabled) => {
                let Change {
                    patient, practice, ..
                } = change;
                conversation_text(
                    state,
                    patient,
                    practice,
                    seq,
                    gateway,
                    provider_message_id,
                    body,
                )
                .await
            }
            _ => Ok((seq, ReplyOutcome::NotForPatient)),
        },
    }
}

/// A text from an enabled patient that is no keyword: a message of the conversation,
/// stored once per provider message id.
async fn conversation_text(
    state: &Shared,
    patient: patient::Model,
    practice: practice::Model,
    seq: i64,
    gateway: &str,
    provider_message_id: &str,
    body: Body,
) -> Result<(i64, ReplyOutcome), SmsError> {
    let patient_id = patient.id.clone();
    // The rows this actor just read: the message needs no second read.
    let message = SendMessage {
        rows: Some(Rows::of(patient, practice)),
        ..SendMessage::inbound_sms(gateway, provider_message_id, body)
    };
    match crate::actors::conversation::try_send(state, &patient_id, Some(seq), message).await {
        Ok((seq, stored)) => Ok((
            seq,
            if stored.replayed {
                ReplyOutcome::Duplicate
            } else {
                ReplyOutcome::Message(stored.message.seq)
            },
        )),
        // A retry of a text that was no conversation message the first time (a
        // date-of-birth reply, a keyword, a text kept in the unmatched log): its
        // receipt refused the message.
        Err(err)
            if !matches!(err, SendError::Unavailable(_))
                && crate::gateways::inbound::seen(state, gateway, provider_message_id).await? =>
        {
            Ok((seq, ReplyOutcome::Duplicate))
        }
        Err(err) => Err(err.into()),
    }
}

/// A reply to a pending session that is no keyword: the date of birth, or a wrong
/// attempt. Never stored as a message; the attempt is recorded without its text.
async fn dob_reply(
    mut change: Change<'_>,
    session: sms_auth_session::Model,
    gateway: &str,
    phone: &str,
    body: Body,
    receipt: WriteUnit,
) -> Result<(i64, ReplyOutcome), SmsError> {
    let now = change.now;
    change.add(receipt);
    let outcome = pending_reply(body.expose(), change.patient.date_of_birth);
    let attempt = |outcome: &str| {
        WriteUnit::new().insert(sms_auth_attempt::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            session_id: Set(session.id.clone()),
            at: Set(now),
            outcome: Set(outcome.to_owned()),
        })
    };
    match outcome {
        PendingReply::Confirmed => {
            change.add(attempt("correct"));
            change.add(session_end(&session.id, SmsAuthStatus::Enabled, None, now));
            change.status(
                SmsStatus::Enabled,
                None,
                Some(&session.id),
                None,
                "The patient confirmed their date of birth; text messaging is enabled.",
            );
            let text = change.template(Template::Confirmed);
            change.text(phone, text, None).await?;
        }
        // Keywords were handled before; what reply.rs still calls a keyword here
        // (START while pending) counts as a wrong attempt.
        PendingReply::WrongAttempt | PendingReply::OptOut | PendingReply::Help => {
            let attempts = session.attempts + 1;
            let max = i32::try_from(change.settings.sms_auth.max_attempts).unwrap_or(i32::MAX);
            change.add(
                attempt("wrong").exec(
                    sms_auth_session::Entity::update_many()
                        .col_expr(sms_auth_session::Column::Attempts, Expr::value(attempts))
                        .filter(sms_auth_session::Column::Id.eq(session.id.clone()))
                        .filter(sms_auth_session::Column::Attempts.eq(session.attempts))
                        .filter(sms_auth_session::Column::Status.eq(SmsAuthStatus::Pending))
                        .into_query(),
                    Expect::Exactly(1),
                    "attempt counted once",
                ),
            );
            if attempts >= max {
                change.add(
                    WriteUnit::new()
                        .exec(
                            sms_auth_session::Entity::update_many()
                                .col_expr(
                                    sms_auth_session::Column::Status,
                                    Expr::value(SmsAuthStatus::Failed),
                                )
                                .col_expr(
                                    sms_auth_session::Column::Reason,
                                    Expr::value(SmsStatusReason::WrongDob3x.as_str()),
                                )
                                .col_expr(sms_auth_session::Column::EndedAt, Expr::value(now))
                                .filter(sms_auth_session::Column::Id.eq(session.id.clone()))
                                .into_query(),
                            Expect::Exactly(1),
                            "session exists",
                        )
                        .merge(timers::cancel(TimerKind::SmsAuthWindow, &session.id)),
                );
                change.status(
                    SmsStatus::Failed,
                    Some(SmsStatusReason::WrongDob3x),
                    Some(&session.id),
                    None,
                    "Text messaging failed: the date of birth did not match.",
                );
                let text = change.template(Template::Failed);
                change.text(phone, text, None).await?;
            } else {
                let text = change.template(Template::WrongReply);
                change.answer(gateway, phone, text).await?;
            }
        }
    }
    Ok((change.commit(None).await?, ReplyOutcome::Handled))
}

/// The timer handler of session windows: hands the expiry to the patient's actor,
/// which fails the session and fires the timer in one unit. A timer whose session
/// already ended fires alone; one that a resend moved later waits.
pub fn window_handler(state: &Shared) -> std::sync::Arc<dyn timers::TimerHandler> {
    let weak = std::sync::Arc::downgrade(state);
    timers::handler_fn(
        move |timer: caremsg_entities::timer::Model, now: DateTime<Utc>| {
            let weak = weak.clone();
            async move {
                let state = weak.upgrade().ok_or(timers::TimerError::Stopped)?;
                let session = sms_auth_session::Entity::find_by_id(timer.subject.clone())
                    .one(&state.db)
                    .await
                    .map_err(timers::TimerError::Read)?;
                let ended = session
                    .as_ref()
                    .is_none_or(|s| s.status != SmsAuthStatus::Pending);
                if let Some(session) = session.filter(|s| s.status == SmsAuthStatus::Pending) {
                    let op = SmsOp::Expire {
                        session_id: session.id.clone(),
                    };
                    let sent = state.conversations.send(
                        &session.patient_id,
                        crate::actors::conversation::Sms {
                            client: "timer".to_owned(),
                            op,
                        },
                    );
                    match sent.await {
                        Ok(Ok(ReplyOutcome::Handled)) => return Ok(timers::FireOutcome::Fired),
                        Ok(Ok(_)) => return Ok(timers::FireOutcome::Skipped),
                        Ok(Err(err)) => return Err(timers::TimerError::Handler(err.to_string())),
                        Err(err) => return Err(timers::TimerError::Handler(err.to_string())),
                    }
                }
                if ended {
                    return timers::fire_with(
                        &state.writer,
                        TimerKind::SmsAuthWindow,
                        &timer.subject,
                        now,
                        WriteUnit::new(),
                    )
                    .await
                    .map_err(timers::TimerError::Write);
                }
                Ok(timers::FireOutcome::Skipped)
            }
        },
    )
}
