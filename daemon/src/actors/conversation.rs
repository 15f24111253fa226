//! `ConversationActor`: one per patient, the only writer of that patient's
//! conversation. It assigns gapless sequence numbers, stores messages with their
//! deliveries (the outbox) in one write unit, moves read markers forward, and
//! publishes live events after the commit.
//!
//! Every handler runs as an atomic response: the actor takes its next message only
//! when the previous one is committed, which is what makes sequence numbers gapless
//! and idempotency checks race-free.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use caremsg_config::GatewayKind;
use caremsg_entities::{
    Channel, DeliveryChannel, DeliveryPurpose, DeliveryStatus, Direction, SmsStatus, conversation,
    delivery, inbound_receipt, message, patient, practice, practice_sms_number, read_marker, user,
};
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QueryTrait,
};

use super::{LiveMap, forget, leave, on_main};
use crate::audit::AuditEntry;
use crate::events::{Event, MessageEvent};
use crate::phi::Phi;
use crate::state::Shared;
use crate::writer::{Expect, WriteError, WriteUnit};

// ----- Messages ---------------------------------------------------------------

/// Who writes a message.
#[derive(Debug, Clone)]
pub enum Author {
    /// A staff user, through the staff application.
    Staff(user::Model),
    /// The patient, through the portal backend.
    Patient,
    /// The patient, by a text that a gateway received (the routing decided it is a
    /// conversation message: the patient's SMS status is enabled and it is no keyword).
    PatientSms {
        /// The gateway instance it came through.
        gateway: String,
        /// The provider's message id: a provider's retry is stored once.
        provider_message_id: String,
    },
}

/// Stores a message written by staff or by the patient (portal), once per
/// `client_txn_id`, with a delivery per channel the patient can be reached on.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Stored, SendError>")]
pub struct SendMessage {
    /// The writer.
    pub author: Author,
    /// The API client (for the audit log).
    pub client: String,
    /// The text.
    pub body: Phi<String>,
    /// The client's transaction id, scoped to the author.
    pub client_txn_id: Option<String>,
    /// The rows the caller read just before (the access check; for a text from a
    /// gateway, what the actor itself read for it), so that the actor need not read
    /// them again. A staff message's channels are chosen from them: an SMS status
    /// change or opt-out that commits after that read is caught when the delivery
    /// is claimed, where consent and the SMS status are checked in the claim's own
    /// unit (`gateways::outbox`), so nothing reaches a number that opted out.
    pub rows: Option<Box<Rows>>,
    /// The practices the calling client serves (`None`: every one): a patient of
    /// another practice is not found.
    pub serves: Option<Vec<String>>,
}

/// What a caller read of the patient before it sent (see [`SendMessage::rows`]).
#[derive(Debug, Clone)]
pub struct Rows {
    /// The patient.
    pub patient: patient::Model,
    /// Its practice.
    pub practice: practice::Model,
    /// The practice's sending number ([`crate::access::Access::sms_from`]); only a
    /// staff message uses it, and only a staff caller need fill it.
    pub sms_from: Option<practice_sms_number::Model>,
}

impl Rows {
    /// The rows of a patient message (no sending number needed).
    pub fn of(patient: patient::Model, practice: practice::Model) -> Box<Self> {
        Box::new(Self {
            patient,
            practice,
            sms_from: None,
        })
    }
}

impl From<crate::access::Access> for Box<Rows> {
    fn from(access: crate::access::Access) -> Self {
        Box::new(Rows {
            patient: access.patient,
            practice: access.practice,
            sms_from: access.sms_from,
        })
    }
}

impl SendMessage {
    /// A text from the patient that a gateway received (the inbound SMS entry point,
    /// "ReceiveSms"): stored as a `from_patient` message on channel `sms`, once per
    /// (gateway, provider message id) — a provider's retry returns the stored message
    /// with `replayed` set.
    pub fn inbound_sms(gateway: &str, provider_message_id: &str, body: Phi<String>) -> Self {
        Self {
            author: Author::PatientSms {
                gateway: gateway.to_owned(),
                provider_message_id: provider_message_id.to_owned(),
            },
            client: format!("gateway:{gateway}"),
            body,
            client_txn_id: None,
            rows: None,
            serves: None,
        }
    }
}

/// Who read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reader {
    /// A staff user.
    User(String),
    /// The patient (portal).
    Patient,
}

impl Reader {
    fn key(&self) -> String {
        match self {
            Self::User(id) => read_marker::Model::user_reader(id),
            Self::Patient => read_marker::READER_PATIENT.to_owned(),
        }
    }
}

/// Moves `reader`'s read marker forward to `up_to` (never back); returns the marker.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<i64, SendError>")]
pub struct MarkRead {
    /// Who read.
    pub reader: Reader,
    /// The newest sequence number read; `None`: the conversation's newest message.
    pub up_to: Option<i64>,
    /// Committed in the marker's unit (e.g. the audit row of the read), or alone when
    /// the marker does not move: one write where there would be two.
    pub also: WriteUnit,
}

/// An SMS authentication action or a text from the patient's number: see
/// [`crate::sms::auth`]. Runs in this actor because every transition appends a
/// `system` message to the conversation in the same transaction.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<crate::sms::auth::ReplyOutcome, crate::sms::auth::SmsError>")]
pub struct Sms {
    /// The API client or gateway (for the audit log).
    pub client: String,
    /// What to do.
    pub op: crate::sms::auth::SmsOp,
}

/// Wakes the actor (starting it if needed) and does nothing else: for benchmarks
/// and for warming a conversation before a burst.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Ping;

/// A message as stored, with its deliveries.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The message.
    pub message: message::Model,
    /// One per channel it goes out on.
    pub deliveries: Vec<delivery::Model>,
    /// This is the stored result of an earlier request with the same transaction id.
    pub replayed: bool,
}

/// Why a message was not stored.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// The patient is gone (deleted, or the actor's patient no longer exists).
    #[error("no such patient")]
    NotFound,
    /// Neither SMS nor portal reaches the patient.
    #[error("the patient cannot be reached on any channel")]
    Unreachable,
    /// The practice has no portal chat.
    #[error("the practice has no portal chat")]
    PortalDisabled,
    /// The patient is not enrolled in the portal.
    #[error("the patient is not enrolled in the portal")]
    PortalNotEnrolled,
    /// Empty or whitespace only.
    #[error("the body is empty")]
    EmptyBody,
    /// Longer than the channel allows.
    #[error("the body is longer than {limit} characters")]
    TooLong {
        /// The limit, in characters.
        limit: usize,
    },
    /// The transaction id is too long or malformed.
    #[error("client_txn_id must be 1 to 128 characters")]
    BadTxnId,
    /// The transaction id was used before with another body.
    #[error("client_txn_id was already used with a different body")]
    TxnReused,
    /// The database or writer failed.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The storage cannot take or serve writes now, or the commit's outcome is
    /// unknown ([`WriteError::is_storage`]).
    #[error("{0}")]
    Unavailable(WriteError),
}

impl From<DbErr> for SendError {
    fn from(err: DbErr) -> Self {
        if crate::db::fault(&err).is_some() {
            Self::Unavailable(WriteError::Unavailable(err.to_string()))
        } else {
            Self::Storage(err.to_string())
        }
    }
}

impl From<WriteError> for SendError {
    fn from(err: WriteError) -> Self {
        if err.is_storage() {
            Self::Unavailable(err)
        } else {
            Self::Storage(err.to_string())
        }
    }
}

/// Most read markers an actor remembers; past it, it starts over (a marker it does
/// not know is read from the database).
const KNOWN_MARKERS: usize = 64;

/// What an actor knows of its conversation without reading it, because it is the
/// conversation's only writer (of messages, read markers and the patient's read
/// stamps) within this daemon's term — a daemon that steps down re-executes itself,
/// so nothing known survives into another term. Whatever was written with an
/// unknown outcome is forgotten ([`Known::forget`]) and read again.
#[derive(Debug, Default)]
struct Known {
    // The conversation's newest sequence number, once read.
    last_seq: Option<i64>,
    // Read markers by reader key.
    markers: HashMap<String, i64>,
    // Whether a staff message is not yet stamped read by the patient; `None`: not known.
    unread_by_patient: Option<bool>,
    // The patient's and practice's rows as this actor last read them: used only
    // while no admin request has written since. SMS steps are the only other writer
    // of the patient's row: every step forgets them but a text stored as a
    // conversation message, which changes neither row (`sms::auth::run`).
    rows: Option<Remembered>,
}

/// The patient's and practice's rows as an actor last read them, filed under the
/// admin-write generation taken before that read (`access::Users::generation`).
#[derive(Debug)]
pub struct Remembered {
    rows: Box<Rows>,
    generation: u64,
}

impl Remembered {
    /// Files `rows`, read after `generation` was taken.
    pub fn new(rows: Box<Rows>, generation: u64) -> Self {
        Self { rows, generation }
    }

    /// The rows, if no admin request has written since they were read: the
    /// generation is still `now`.
    pub fn current(self, now: u64) -> Option<Box<Rows>> {
        (self.generation == now).then_some(self.rows)
    }
}

impl Known {
    fn marker(&self, reader: &Reader) -> Option<i64> {
        self.markers.get(&reader.key()).copied()
    }

    fn set_marker(&mut self, reader: &Reader, seq: i64) {
        if self.markers.len() >= KNOWN_MARKERS {
            self.markers.clear();
        }
        self.markers.insert(reader.key(), seq);
    }

    fn forget(&mut self) {
        *self = Self::default();
    }
}

// ----- The actor ----------------------------------------------------------------

/// The actor of one patient's conversation.
pub struct ConversationActor {
    // Whose conversation.
    patient_id: String,
    // Identifies this incarnation in the registry (see `forget`).
    generation: u64,
    // The daemon's state: database, writer, settings, clock, events.
    state: Shared,
    // The registry's map, to remove this actor when it passivates.
    live: Arc<Mutex<LiveMap>>,
    // What the actor knows of its conversation because only it writes it.
    known: Known,
    // When the actor last handled a message (for passivation).
    last_used: Instant,
}

impl ConversationActor {
    pub(super) fn new(
        patient_id: String,
        generation: u64,
        state: Shared,
        live: Arc<Mutex<LiveMap>>,
    ) -> Self {
        Self {
            patient_id,
            generation,
            state,
            live,
            known: Known::default(),
            last_used: Instant::now(),
        }
    }

    fn idle_timeout(&self) -> Duration {
        self.state.settings.load().conversations.idle_timeout
    }

    /// Checks for idleness after the configured idle time; stops when idle.
    fn arm_passivation(&self, ctx: &mut Context<Self>) {
        let wait = self.idle_timeout().saturating_sub(self.last_used.elapsed());
        ctx.run_later(wait, |actor, ctx| {
            if actor.last_used.elapsed() >= actor.idle_timeout() {
                forget(&actor.live, &actor.patient_id, actor.generation);
                ctx.stop();
            } else {
                actor.arm_passivation(ctx);
            }
        });
    }
}

impl Actor for ConversationActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.arm_passivation(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Whatever stopped it, the registry must not keep a dead address.
        forget(&self.live, &self.patient_id, self.generation);
    }
}

/// Asks the actor to passivate now, to make room in the registry
/// (`conversations.max_live`): it has handled every message sent before this one; it
/// stops unless a message for its patient took it back since.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Passivate;

impl Handler<Passivate> for ConversationActor {
    type Result = ();

    fn handle(&mut self, _: Passivate, ctx: &mut Context<Self>) {
        if leave(&self.live, &self.patient_id, self.generation) {
            ctx.stop();
        }
    }
}

/// Sends `message`: see [`SendMessage`].
impl Handler<SendMessage> for ConversationActor {
    type Result = AtomicResponse<Self, Result<Stored, SendError>>;

    fn handle(&mut self, msg: SendMessage, _ctx: &mut Context<Self>) -> Self::Result {
        self.last_used = Instant::now();
        let state = self.state.clone();
        let patient_id = self.patient_id.clone();
        // Taken, not copied: the next handler waits for this one to put it back.
        let known = std::mem::take(&mut self.known);
        let work = on_main(&state.runtime.clone(), async move {
            send(&state, &patient_id, known, msg).await
        });
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|outcome, actor, _| {
            let (known, result) = outcome.unwrap_or((
                Known::default(),
                Err(SendError::Storage("the send task failed".into())),
            ));
            actor.known = known;
            result
        })))
    }
}

/// Moves a read marker: see [`MarkRead`].
impl Handler<MarkRead> for ConversationActor {
    type Result = AtomicResponse<Self, Result<i64, SendError>>;

    fn handle(&mut self, msg: MarkRead, _ctx: &mut Context<Self>) -> Self::Result {
        self.last_used = Instant::now();
        let state = self.state.clone();
        let patient_id = self.patient_id.clone();
        // Taken, not copied: the next handler waits for this one to put it back.
        let known = std::mem::take(&mut self.known);
        let work = on_main(&state.runtime.clone(), async move {
            let mut known = known;
            let result = mark_read(&state, &patient_id, &mut known, msg).await;
            if result.is_err() {
                known.forget();
            }
            (known, result)
        });
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|outcome, actor, _| {
            let (known, result) = outcome.unwrap_or((
                Known::default(),
                Err(SendError::Storage("the mark-read task failed".into())),
            ));
            actor.known = known;
            result
        })))
    }
}

/// Runs an SMS authentication step: see [`Sms`].
impl Handler<Sms> for ConversationActor {
    type Result =
        AtomicResponse<Self, Result<crate::sms::auth::ReplyOutcome, crate::sms::auth::SmsError>>;

    fn handle(&mut self, msg: Sms, _ctx: &mut Context<Self>) -> Self::Result {
        self.last_used = Instant::now();
        let state = self.state.clone();
        let patient_id = self.patient_id.clone();
        let last_seq = self.known.last_seq;
        // Taken: a step that may change the rows leaves none to put back.
        let rows = self.known.rows.take();
        let work = on_main(&state.runtime.clone(), async move {
            crate::sms::auth::run(&state, &patient_id, last_seq, rows, &msg.client, msg.op).await
        });
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|ran, actor, _| {
            let ran = ran.unwrap_or_else(|| crate::sms::auth::Ran {
                last_seq: None,
                rows: None,
                result: Err(crate::sms::auth::SmsError::Storage(
                    "the SMS task failed".into(),
                )),
            });
            actor.known.last_seq = ran.last_seq;
            actor.known.rows = ran.rows;
            ran.result
        })))
    }
}

/// Answers at once: see [`Ping`].
impl Handler<Ping> for ConversationActor {
    type Result = ();

    fn handle(&mut self, _msg: Ping, _ctx: &mut Context<Self>) {
        self.last_used = Instant::now();
    }
}

// ----- The work, on the main runtime --------------------------------------------

/// Longest client transaction id.
const MAX_TXN_ID: usize = 128;

async fn send(
    state: &Shared,
    patient_id: &str,
    mut known: Known,
    msg: SendMessage,
) -> (Known, Result<Stored, SendError>) {
    match try_send_known(state, patient_id, &mut known, msg).await {
        Ok((seq, stored)) => {
            known.last_seq = Some(seq);
            (known, Ok(stored))
        }
        // After a storage failure the next message re-reads what it needs.
        Err(err @ (SendError::Storage(_) | SendError::Unavailable(_))) => {
            (Known::default(), Err(err))
        }
        Err(err) => (known, Err(err)),
    }
}

/// [`try_send`] for a caller that knows nothing of the conversation.
pub(crate) async fn try_send(
    state: &Shared,
    patient_id: &str,
    last_seq: Option<i64>,
    msg: SendMessage,
) -> Result<(i64, Stored), SendError> {
    let mut known = Known {
        last_seq,
        ..Known::default()
    };
    try_send_known(state, patient_id, &mut known, msg).await
}

async fn try_send_known(
    state: &Shared,
    patient_id: &str,
    known_state: &mut Known,
    mut msg: SendMessage,
) -> Result<(i64, Stored), SendError> {
    let db = &state.db;
    let last_seq = known_state.last_seq;
    let generation = state.users.generation();
    let given = msg.rows.take().filter(|rows| rows.patient.id == patient_id);
    // What this actor read for an earlier patient message, if no admin request has
    // written since (and no SMS step but a conversation text ran: the others forget
    // it).
    let remembered = match (&given, &msg.author) {
        (None, Author::Patient | Author::PatientSms { .. }) => known_state
            .rows
            .take()
            .and_then(|remembered| remembered.current(generation))
            .map(|rows| *rows),
        _ => None,
    };
    let read_here = given.is_none();
    let rows = match given.map(|rows| *rows).or(remembered) {
        Some(rows) => rows,
        None => {
            let (patient, practice) = crate::access::active_patient(db, patient_id)
                .await?
                .ok_or(SendError::NotFound)?;
            let sms_from = match msg.author {
                Author::Staff(_) if sms_reachable(&patient, &practice) => {
                    practice_sms_number::Entity::find()
                        .filter(practice_sms_number::Column::PracticeId.eq(practice.id.clone()))
                        .order_by_asc(practice_sms_number::Column::Number)
                        .one(db)
                        .await?
                }
                _ => None,
            };
            Rows {
                patient,
                practice,
                sms_from,
            }
        }
    };
    if !(rows.patient.active && rows.practice.active)
        || msg
            .serves
            .as_ref()
            .is_some_and(|serves| !serves.contains(&rows.practice.id))
    {
        return Err(SendError::NotFound);
    }
    if read_here {
        known_state.rows = Some(Remembered::new(Box::new(rows.clone()), generation));
    }
    let Rows {
        patient, practice, ..
    } = &rows;
    if matches!(msg.author, Author::Patient) {
        if !practice.portal_enabled {
            return Err(SendError::PortalDisabled);
        }
        if !patient.portal_enrolled {
            return Err(SendError::PortalNotEnrolled);
        }
    }
    let author_key = match &msg.author {
        Author::Staff(user) => format!("user:{}", user.id),
        Author::Patient | Author::PatientSms { .. } => "patient".to_owned(),
    };
    let txn_key = match &msg.client_txn_id {
        None => None,
        Some(txn)
            if txn.is_empty()
                || txn.chars().count() > MAX_TXN_ID
                || txn.chars().any(char::is_control) =>
        {
            return Err(SendError::BadTxnId);
        }
        Some(txn) => Some(format!("{author_key}/{txn}")),
    };
    let current_seq = match last_seq {
        Some(seq) => seq,
        None => current_last_seq(state, patient_id).await?,
    };
    // A retry is not looked for before the message is stored: the unique indexes
    // `(patient_id, client_txn_key)` and `(gateway, provider_message_id)` refuse a
    // second message, and only a send that failed (that refusal, or a check that the
    // original passed before something changed) looks for what the first one
    // stored. A retry gets the stored message, whatever has changed since.
    match store(state, known_state, &msg, rows, txn_key.clone(), current_seq).await {
        Err(err) if !matches!(err, SendError::Unavailable(_)) => {
            match stored_before(db, patient_id, &msg.author, txn_key.as_deref()).await? {
                Some((earlier, _)) if earlier.body != *msg.body.expose() && txn_key.is_some() => {
                    Err(SendError::TxnReused)
                }
                Some((earlier, deliveries)) => Ok((
                    current_seq,
                    Stored {
                        message: earlier,
                        deliveries,
                        replayed: true,
                    },
                )),
                None => Err(err),
            }
        }
        other => other,
    }
}

/// A staff message to `patient` goes by SMS too (given a sending number).
fn sms_reachable(patient: &patient::Model, practice: &practice::Model) -> bool {
    practice.sms_enabled
        && patient.sms_status == SmsStatus::Enabled
        && patient.mobile_phone.is_some()
}

/// The message a retry of this send would repeat: the one the provider's message id
/// stored (a text from a gateway; without its deliveries, as a text has none), or the
/// one `txn_key` stored, with its deliveries.
async fn stored_before(
    db: &impl ConnectionTrait,
    patient_id: &str,
    author: &Author,
    txn_key: Option<&str>,
) -> Result<Option<(message::Model, Vec<delivery::Model>)>, DbErr> {
    if let Author::PatientSms {
        gateway,
        provider_message_id,
    } = author
    {
        return Ok(message::Entity::find()
            .filter(message::Column::Gateway.eq(gateway.clone()))
            .filter(message::Column::ProviderMessageId.eq(provider_message_id.clone()))
            .one(db)
            .await?
            .map(|earlier| (earlier, Vec::new())));
    }
    let Some(key) = txn_key else {
        return Ok(None);
    };
    let Some(earlier) = message::Entity::find()
        .filter(message::Column::PatientId.eq(patient_id))
        .filter(message::Column::ClientTxnKey.eq(key))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    let deliveries = delivery::Entity::find()
        .filter(delivery::Column::MessageId.eq(earlier.id.clone()))
        .order_by_asc(delivery::Column::Channel)
        .all(db)
        .await?;
    Ok(Some((earlier, deliveries)))
}

/// Stores `msg` as the conversation's message `current_seq + 1`, with a delivery per
/// channel the patient can be reached on, the author's read marker, the audit entry
/// and the notifications it raises, in one unit; then tells the streams.
async fn store(
    state: &Shared,
    known_state: &mut Known,
    msg: &SendMessage,
    rows: Rows,
    txn_key: Option<String>,
    current_seq: i64,
) -> Result<(i64, Stored), SendError> {
    let db = &state.db;
    let Rows {
        patient,
        practice,
        sms_from,
    } = rows;
    if msg.body.expose().trim().is_empty() {
        return Err(SendError::EmptyBody);
    }
    let settings = state.settings.load();
    let now = state.clock.now();
    let seq = current_seq + 1;
    let message_id = uuid::Uuid::now_v7().to_string();
    let mut deliveries = Vec::new();
    let (direction, channel) = match &msg.author {
        Author::Staff(user) => {
            let sms_number = sms_from.filter(|_| sms_reachable(&patient, &practice));
            let portal = practice.portal_enabled && patient.portal_enrolled;
            if sms_number.is_none() && !portal {
                return Err(SendError::Unreachable);
            }
            let limit = if sms_number.is_some() {
                settings.conversations.sms_body_max_chars
            } else {
                settings.conversations.portal_body_max_chars
            };
            if msg.body.expose().chars().count() > limit {
                return Err(SendError::TooLong { limit });
            }
            let delivery = |channel, gateway: Option<String>| delivery::Model {
                id: uuid::Uuid::now_v7().to_string(),
                message_id: Some(message_id.clone()),
                notification_id: None,
                patient_id: Some(patient.id.clone()),
                practice_id: practice.id.clone(),
                channel,
                purpose: DeliveryPurpose::Message,
                gateway,
                recipient: None,
                from_number: None,
                subject: None,
                body: None,
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
            if let Some(number) = sms_number {
                let mut text = msg.body.expose().clone();
                if practice.sign_outbound_sms {
                    text = format!("{text}\n- {}", user.name);
                }
                deliveries.push(delivery::Model {
                    recipient: patient.mobile_phone.clone(),
                    from_number: Some(number.number.clone()),
                    body: Some(text),
                    ..delivery(DeliveryChannel::Sms, Some(number.gateway.clone()))
                });
            }
            if portal {
                let gateway = settings
                    .gateways
                    .iter()
                    .find(|g| g.kind == GatewayKind::Portal)
                    .map(|g| g.name.clone());
                deliveries.push(delivery(DeliveryChannel::Portal, gateway));
            }
            let channel = if deliveries.iter().any(|d| d.channel == DeliveryChannel::Sms) {
                Channel::Sms
            } else {
                Channel::Portal
            };
            (Direction::ToPatient, channel)
        }
        Author::Patient => {
            let limit = settings.conversations.portal_body_max_chars;
            if msg.body.expose().chars().count() > limit {
                return Err(SendError::TooLong { limit });
            }
            (Direction::FromPatient, Channel::Portal)
        }
        // What a carrier delivered is stored whatever its length.
        Author::PatientSms { .. } => (Direction::FromPatient, Channel::Sms),
    };
    let author_user_id = match &msg.author {
        Author::Staff(user) => Some(user.id.clone()),
        Author::Patient | Author::PatientSms { .. } => None,
    };
    let (gateway, provider_message_id) = match &msg.author {
        Author::PatientSms {
            gateway,
            provider_message_id,
        } => (Some(gateway.clone()), Some(provider_message_id.clone())),
        _ => (None, None),
    };
    let possible_opt_out = matches!(msg.author, Author::PatientSms { .. } | Author::Patient)
        && crate::sms::keywords::mentions_opt_out(msg.body.expose());
    let stored = message::Model {
        id: message_id,
        patient_id: patient.id.clone(),
        seq,
        direction,
        channel,
        author_user_id: author_user_id.clone(),
        body: msg.body.expose().clone(),
        client_txn_key: txn_key,
        gateway,
        provider_message_id,
        possible_opt_out,
        read_by_patient_at: None,
        created_at: now,
    };
    // Inserts first, then the statements that update: the writer merges every unit's
    // leading inserts across a batch into multi-row INSERTs, so this order is what
    // makes a busy conversation cheap to store.
    let mut unit = WriteUnit::new().insert(message::ActiveModel::from(stored.clone()));
    // A text from a gateway records its receipt in its own unit: one commit, and the
    // provider's retry is known as a duplicate from then on.
    if let Author::PatientSms {
        gateway,
        provider_message_id,
    } = &msg.author
    {
        unit = unit.insert(inbound_receipt::ActiveModel {
            gateway: Set(gateway.clone()),
            provider_message_id: Set(provider_message_id.clone()),
            received_at: Set(now),
            outcome: Set(crate::gateways::inbound::EventOutcome::Conversation
                .as_str()
                .to_owned()),
        });
    }
    let mut unit = unit.merge(sequence_unit(&patient.id, current_seq, seq, now));
    for d in &deliveries {
        unit = unit.insert(delivery::ActiveModel::from(d.clone()));
    }
    // Sending marks the conversation read for its author (a text arriving by SMS is
    // not a sign the patient read the portal).
    let reader = match &msg.author {
        Author::Staff(user) => Some(Reader::User(user.id.clone())),
        Author::Patient => Some(Reader::Patient),
        Author::PatientSms { .. } => None,
    };
    if let Some(reader) = &reader {
        unit = unit.insert_or_update_marker(&patient.id, reader, seq, now);
    }
    let audit = AuditEntry {
        client: &msg.client,
        actor_user_id: author_user_id.as_deref(),
        patient_id: Some(&patient.id),
        action: match msg.author {
            Author::Staff(_) => "message.send",
            Author::Patient => "portal.message.send",
            Author::PatientSms { .. } => "sms.message.receive",
        },
        detail: Some(format!("seq={seq}")),
    };
    unit = audit.add_to(unit, now);
    // A message from the patient notifies in the message's unit: at most once, also across
    // crashes. Staff messages notify no one.
    let mut notify = match &msg.author {
        Author::Staff(_) => crate::notifications::Notify::default(),
        Author::Patient | Author::PatientSms { .. } => {
            crate::notifications::on_patient_message(db, &settings, &patient, &stored).await?
        }
    };
    unit = unit.merge(notify.take_unit());
    let stamps = match reader {
        Some(Reader::Patient) => match known_state.unread_by_patient {
            Some(unread) => unread,
            None => unread_by_patient(state, &patient.id, seq).await?,
        },
        _ => false,
    };
    if stamps {
        unit = unit.merge(patient_read_unit(&patient.id, seq, now));
    }
    state.writer.write(unit).await?;
    if let Some(reader) = &reader {
        known_state.set_marker(reader, seq);
    }
    match msg.author {
        Author::Staff(_) => known_state.unread_by_patient = Some(true),
        // Everything up to this message is stamped read by the patient now.
        Author::Patient => known_state.unread_by_patient = Some(false),
        Author::PatientSms { .. } => {}
    }
    state.metrics.messages_stored.inc();
    let message = Event::Message(Arc::new(MessageEvent {
        patient_id: patient.id.clone(),
        practice_id: practice.id.clone(),
        seq,
        direction,
        channel,
        body: msg.body.clone(),
    }));
    notify.publish_with(state, vec![message]).await;
    Ok((
        seq,
        Stored {
            message: stored,
            deliveries,
            replayed: false,
        },
    ))
}

/// Moves the conversation's `last_seq` from `from` to `to`, or fails the unit if it
/// is not at `from` any more: the guard that keeps sequence numbers gapless and
/// unique whoever appends (messages, SMS status events).
///
/// A compare-and-set: put it among the unit's leading inserts, so that the guards of
/// a whole batch are one statement.
pub(crate) fn sequence_unit(patient_id: &str, from: i64, to: i64, now: DateTime<Utc>) -> WriteUnit {
    use conversation::Column as C;
    WriteUnit::new().compare_and_set(
        (C::PatientId, patient_id.into()),
        (C::LastSeq, from.into()),
        vec![
            (C::LastSeq, to.into()),
            (C::LastMessageAt, Some(now).into()),
        ],
        "conversation sequence",
    )
}

async fn current_last_seq(state: &Shared, patient_id: &str) -> Result<i64, SendError> {
    Ok(conversation::Entity::find_by_id(patient_id.to_owned())
        .one(&state.db)
        .await?
        .ok_or(SendError::NotFound)?
        .last_seq)
}

/// The unit that moves `reader`'s marker to `seq` (callers check it moves forward);
/// for the patient it also stamps the staff messages it covers as read.
fn read_unit(patient_id: &str, reader: &Reader, seq: i64, now: DateTime<Utc>) -> WriteUnit {
    let unit = WriteUnit::new().insert_or_update_marker(patient_id, reader, seq, now);
    if *reader == Reader::Patient {
        unit.merge(patient_read_unit(patient_id, seq, now))
    } else {
        unit
    }
}

/// Stamps the staff messages up to `seq` the patient had not read yet.
fn patient_read_unit(patient_id: &str, seq: i64, now: DateTime<Utc>) -> WriteUnit {
    WriteUnit::new().exec(
        message::Entity::update_many()
            .col_expr(message::Column::ReadByPatientAt, Expr::value(now))
            .filter(message::Column::PatientId.eq(patient_id))
            .filter(message::Column::Direction.eq(Direction::ToPatient))
            .filter(message::Column::Seq.lte(seq))
            .filter(message::Column::ReadByPatientAt.is_null())
            .into_query(),
        Expect::Any,
        "messages read by the patient",
    )
}

/// Whether a staff message up to `seq` is not yet read by the patient (a read, so
/// that the common case adds no statement to the writer's batch).
async fn unread_by_patient(state: &Shared, patient_id: &str, seq: i64) -> Result<bool, DbErr> {
    Ok(message::Entity::find()
        .filter(message::Column::PatientId.eq(patient_id))
        .filter(message::Column::Direction.eq(Direction::ToPatient))
        .filter(message::Column::Seq.lte(seq))
        .filter(message::Column::ReadByPatientAt.is_null())
        .one(&state.db)
        .await?
        .is_some())
}

/// The read marker as a write: `reader` has read `patient_id`'s conversation up to `seq`.
trait MarkerUnit {
    fn insert_or_update_marker(
        self,
        patient_id: &str,
        reader: &Reader,
        seq: i64,
        now: DateTime<Utc>,
    ) -> Self;
}

impl MarkerUnit for WriteUnit {
    fn insert_or_update_marker(
        self,
        patient_id: &str,
        reader: &Reader,
        seq: i64,
        now: DateTime<Utc>,
    ) -> Self {
        // Forward only in SQL too: the actor writes a marker only forward from what
        // it knows, and the statement keeps that promise whatever it knew.
        self.upsert_forward(
            read_marker::ActiveModel {
                patient_id: Set(patient_id.to_owned()),
                reader: Set(reader.key()),
                last_read_seq: Set(seq),
                read_at: Set(now),
            },
            &[read_marker::Column::PatientId, read_marker::Column::Reader],
            read_marker::Column::LastReadSeq,
        )
    }
}

/// `known`: what the actor knows (updated with what this read writes).
async fn mark_read(
    state: &Shared,
    patient_id: &str,
    known: &mut Known,
    msg: MarkRead,
) -> Result<i64, SendError> {
    let db = &state.db;
    let newest = match known.last_seq {
        Some(seq) => seq,
        None => current_last_seq(state, patient_id).await?,
    };
    let up_to = msg.up_to.unwrap_or(newest).clamp(0, newest);
    let current = match known.marker(&msg.reader) {
        Some(seq) => seq,
        None => read_marker::Entity::find_by_id((patient_id.to_owned(), msg.reader.key()))
            .one(db)
            .await?
            .map_or(0, |m| m.last_read_seq),
    };
    known.set_marker(&msg.reader, current);
    if up_to <= current {
        if !msg.also.is_empty() {
            state.writer.write(msg.also).await?;
        }
        return Ok(current);
    }
    let mut unit = read_unit(patient_id, &msg.reader, up_to, state.clock.now()).merge(msg.also);
    // Viewing cancels the user's unread reminder.
    if let Reader::User(user_id) = &msg.reader {
        unit = unit.merge(crate::notifications::reminder::on_view(
            patient_id, user_id, current, up_to,
        ));
    }
    state.writer.write(unit).await?;
    known.set_marker(&msg.reader, up_to);
    if msg.reader == Reader::Patient {
        // Stamped up to `up_to`: nothing unread is left if that is the newest.
        known.unread_by_patient = (up_to == newest).then_some(false);
    }
    Ok(up_to)
}
