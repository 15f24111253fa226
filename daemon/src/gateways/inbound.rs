//! Inbound: what plugins report — texts from patients, delivery receipts, opt-outs —
//! committed before anyone is told it was taken.
//!
//! Webhook events ([`commit`], called by `api::hooks` before it answers the provider)
//! and events a plugin emits on its own (the inbound task, [`run_emitted`]) take the
//! same path:
//!
//! - **A text** is recognised by `(gateway, provider message id)`: seen before, it is
//!   a provider's retry and nothing is stored again. Whatever the rate, every new text
//!   is stored before the provider is answered: the instance's
//!   `auto_answers_per_sender` limit throttles only caremsg's automatic answers
//!   (`sms::auth`), never a text or a keyword's effect. [`route`] decides:
//!   a text to a practice's number from the mobile number of an active patient of
//!   that practice whose SMS status is `pending` or `enabled` (or, for a keyword,
//!   `opted_out`) goes to that patient's actor, where SMS authentication takes
//!   keywords and date-of-birth replies and the conversation stores the rest, once
//!   per provider id; any other text goes to the unmatched-inbound log, together
//!   with its `inbound_receipts` row in one unit (an insert-or-ignore that must
//!   insert, so a concurrent duplicate rolls the unit back).
//! - **A delivery receipt** is deduplicated by (provider id, status) — a replayed
//!   status callback changes nothing — and moves the delivery with that provider id
//!   forward only: `queued`/`sending` → `sent` → `delivered` | `failed` |
//!   `undelivered`; never backward, never from one final status to another. A receipt
//!   for an id no delivery carries yet (its send's outcome is not recorded yet) is
//!   parked (`parked_receipts`) and applied when the outcome records the id
//!   ([`apply_parked`]). A failed receipt with a carrier opt-out code opts out that
//!   delivery's number for that delivery's practice only, never over a consent
//!   change newer than the send.
//! - **An opt-out** opts the number out of every practice whose numbers this instance
//!   serves, then tells its patients' actors ([`super::consent`]) — unless it came in
//!   the same callback as a delivery receipt, which scopes it (above).

use std::sync::Arc;

use caremsg_entities::{
    DeliveryChannel, DeliveryStatus, SmsStatus, delivery, inbound_receipt, parked_receipt, patient,
    practice, practice_sms_number, sms_consent, unmatched_inbound,
};
use caremsg_plugin_host::{Event, ReceiptStatus};
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveEnum, ColumnTrait, DbErr, EntityTrait, FromQueryResult, IdenStatic, Iterable,
    QueryFilter, QueryOrder, QuerySelect, QueryTrait,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::host::Emitted;
use super::instance::GatewayInstance;
use crate::phi::{Body, Phi, Phone};
use crate::state::Shared;
use crate::writer::{Expect, WriteError, WriteUnit};

/// The precondition named when an inbound receipt already existed: the unit holding
/// it is a provider's retry and was rolled back.
pub const RECEIPT_IS_NEW: &str = "the inbound message was not seen before";

/// A text from a phone, as a plugin reported it.
#[derive(Debug, Clone)]
pub struct InboundSms {
    /// The instance that received it.
    pub gateway: String,
    /// The provider's id, unique per instance.
    pub provider_message_id: String,
    /// The sender's number (E.164 once matched to a practice).
    pub from: Phone,
    /// The number it was sent to.
    pub to: Phone,
    /// The text.
    pub body: Body,
}

/// What became of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    /// The text is stored in a patient's conversation.
    Conversation,
    /// The text is stored in the unmatched-inbound log.
    Unmatched,
    /// The text was stored before (a provider's retry); nothing changed.
    Duplicate,
    /// The receipt moved a delivery forward.
    ReceiptApplied,
    /// The receipt would move its delivery backward, or from one final status to
    /// another.
    ReceiptIgnored,
    /// No delivery carries the receipt's provider id yet: it is parked until one does.
    ReceiptParked,
    /// A provider's opt-out report that came with a delivery receipt in the same
    /// callback: the receipt applies it, scoped to its delivery.
    OptOutScoped,
    /// The opt-out is recorded.
    OptedOut,
}

impl EventOutcome {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Conversation => "conversation",
            Self::Unmatched => "unmatched",
            Self::Duplicate => "duplicate",
            Self::ReceiptApplied => "receipt_applied",
            Self::ReceiptIgnored => "receipt_ignored",
            Self::ReceiptParked => "receipt_parked",
            Self::OptOutScoped => "opt_out_scoped",
            Self::OptedOut => "opted_out",
        }
    }
}

/// Why events were not committed; the provider must be told to retry.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// Reading failed.
    #[error("reading failed: {0}")]
    Read(#[from] DbErr),
    /// Committing failed.
    #[error("committing failed: {0}")]
    Write(#[from] WriteError),
    /// The patient's conversation did not store the text.
    #[error("the conversation did not store the text: {0}")]
    Conversation(String),
}

/// Commits `events` of `gateway`, in order; stops at the first failure.
pub async fn commit(
    state: &Shared,
    gateway: &GatewayInstance,
    events: Vec<Event>,
) -> Result<Vec<EventOutcome>, InboundError> {
    let mut outcomes = Vec::with_capacity(events.len());
    // A status callback reports a carrier opt-out as a failed receipt (which applies
    // it to that delivery's practice and number only) and, with it, an opt-out of the
    // bare number: that one must not reach every practice on the gateway.
    let with_receipt = events
        .iter()
        .any(|event| matches!(event, Event::DeliveryReceipt { .. }));
    for event in events {
        let outcome = if with_receipt && matches!(event, Event::OptOut { .. }) {
            Ok(EventOutcome::OptOutScoped)
        } else {
            commit_one(state, gateway, without_nul(event)).await
        };
        let label = match &outcome {
            Ok(outcome) => outcome.as_str(),
            Err(_) => "failed",
        };
        state.metrics.gateway_inbound(gateway.name(), label);
        outcomes.push(outcome?);
    }
    Ok(outcomes)
}

/// `event` with every NUL character removed from its texts. A provider's text is the
/// patient's and is kept, but PostgreSQL cannot store NUL in text, and a text that
/// cannot be stored would be refused with 503 and retried by the provider forever.
fn without_nul(event: Event) -> Event {
    fn strip(text: String) -> String {
        if text.contains('\0') {
            text.replace('\0', "")
        } else {
            text
        }
    }
    match event {
        Event::InboundMessage {
            from,
            to,
            body,
            provider_message_id,
        } => Event::InboundMessage {
            from: strip(from),
            to: strip(to),
            body: strip(body),
            provider_message_id: strip(provider_message_id),
        },
        Event::DeliveryReceipt {
            provider_message_id,
            status,
            error_code,
        } => Event::DeliveryReceipt {
            provider_message_id: strip(provider_message_id),
            status,
            error_code: error_code.map(strip),
        },
        Event::OptOut { number } => Event::OptOut {
            number: strip(number),
        },
    }
}

async fn commit_one(
    state: &Shared,
    gateway: &GatewayInstance,
    event: Event,
) -> Result<EventOutcome, InboundError> {
    match event {
        Event::InboundMessage {
            from,
            to,
            body,
            provider_message_id,
        } => {
            // A provider's retry is recognised by its receipt: in the patient's actor
            // for a text from a patient's number, in `route` for any other.
            route(
                state,
                InboundSms {
                    gateway: gateway.name().to_owned(),
                    provider_message_id,
                    from: Phi::new(from),
                    to: Phi::new(to),
                    body: Phi::new(body),
                },
            )
            .await
        }
        Event::DeliveryReceipt {
            provider_message_id,
            status,
            error_code,
        } => {
            receipt(
                state,
                gateway.name(),
                &provider_message_id,
                status,
                error_code,
            )
            .await
        }
        Event::OptOut { number } => opt_out(state, gateway.name(), Phi::new(number)).await,
    }
}

/// Whether `(gateway, id)` was taken in before (its receipt).
pub(crate) async fn seen(
    state: &Shared,
    gateway: &str,
    provider_message_id: &str,
) -> Result<bool, DbErr> {
    Ok(
        inbound_receipt::Entity::find_by_id((gateway.to_owned(), provider_message_id.to_owned()))
            .one(&state.db)
            .await?
            .is_some(),
    )
}

/// The insert-or-ignore of the receipt of `(gateway, id)`, required to insert
/// ([`RECEIPT_IS_NEW`]) or, with `must_be_new` false, merely recorded.
pub fn receipt_unit(
    gateway: &str,
    provider_message_id: &str,
    outcome: EventOutcome,
    now: DateTime<Utc>,
    must_be_new: bool,
) -> WriteUnit {
    let insert = inbound_receipt::Entity::insert(inbound_receipt::ActiveModel {
        gateway: Set(gateway.to_owned()),
        provider_message_id: Set(provider_message_id.to_owned()),
        received_at: Set(now),
        outcome: Set(outcome.as_str().to_owned()),
    })
    .on_conflict(
        OnConflict::columns([
            inbound_receipt::Column::Gateway,
            inbound_receipt::Column::ProviderMessageId,
        ])
        .do_nothing()
        .to_owned(),
    )
    .into_query();
    let expect = if must_be_new {
        Expect::Exactly(1)
    } else {
        Expect::Any
    };
    WriteUnit::new().exec(insert, expect, RECEIPT_IS_NEW)
}

/// Whether a write failed because its receipt already existed (a duplicate).
pub fn is_duplicate(error: &WriteError) -> bool {
    matches!(error, WriteError::Precondition(what) if *what == RECEIPT_IS_NEW)
}

/// Routes a new inbound text. From the number of a patient whose SMS status is
/// pending or enabled, the patient's actor decides (`sms::auth`: keywords, the date
/// of birth, or a conversation message — the single place inbound texts enter
/// conversations). Anything else goes to the unmatched-inbound log, with the keyword
/// answers SPEC.md gives such numbers (`sms::auth::unmatched`).
pub async fn route(state: &Shared, sms: InboundSms) -> Result<EventOutcome, InboundError> {
    let db = &state.db;
    // The practice texted and the patient pending or enabled on the sender's number
    // (at most one), in one statement. The number is looked for as the provider gave
    // it; when the practice's country normalises it to another form (anything but
    // E.164, which most providers send), the statement runs again with that form.
    let mut found = practice_and_patient_on(db, &sms.to, &sms.from).await?;
    let mut from = sms.from.clone();
    if let Some((practice, _)) = &found
        && practice.active
    {
        let normalised = normalise(&sms.from, &practice.country);
        if normalised.expose() != sms.from.expose() {
            found = practice_and_patient_on(db, &sms.to, &normalised).await?;
            from = normalised;
        }
    }
    let (practice, mut matched) = match found {
        Some((practice, patient)) if practice.active => (Some(practice), patient),
        _ => (None, None),
    };
    // Else, for a keyword, the patient who opted out on this number most recently,
    // whose conversation records the keyword.
    if let Some(practice) = &practice
        && matched.is_none()
        && crate::sms::keywords::classify(sms.body.expose()).is_some()
    {
        matched = patient::Entity::find()
            .select_only()
            .column(patient::Column::Id)
            .filter(patient::Column::PracticeId.eq(practice.id.as_str()))
            .filter(patient::Column::MobilePhone.eq(from.expose().as_str()))
            .filter(patient::Column::Active.eq(true))
            .filter(patient::Column::SmsStatus.eq(SmsStatus::OptedOut))
            .order_by_desc(patient::Column::UpdatedAt)
            .into_tuple()
            .one(db)
            .await?;
    }
    if let Some(patient_id) = matched {
        // Keywords, date-of-birth replies and conversation messages: the SMS
        // authentication decides, in the patient's actor.
        let op = crate::sms::auth::SmsOp::Reply {
            gateway: sms.gateway.clone(),
            provider_message_id: sms.provider_message_id.clone(),
            body: sms.body.clone(),
        };
        let outcome = state
            .conversations
            .send(
                &patient_id,
                crate::actors::conversation::Sms {
                    client: format!("gateway:{}", sms.gateway),
                    op,
                },
            )
            .await
            .map_err(|error| InboundError::Conversation(error.to_string()))?
            .map_err(|error| InboundError::Conversation(error.to_string()))?;
        // The actor committed the text's receipt with what the text did.
        match outcome {
            crate::sms::auth::ReplyOutcome::Duplicate => return Ok(EventOutcome::Duplicate),
            crate::sms::auth::ReplyOutcome::Handled
            | crate::sms::auth::ReplyOutcome::Message(_) => {
                return Ok(EventOutcome::Conversation);
            }
            // (An admin upsert's answer; a text never gets it.)
            crate::sms::auth::ReplyOutcome::NotForPatient
            | crate::sms::auth::ReplyOutcome::Status(_) => {}
        }
    }
    if seen(state, &sms.gateway, &sms.provider_message_id).await? {
        return Ok(EventOutcome::Duplicate);
    }
    // A STOP's consent change is guarded (`NOT_YET_OPTED_OUT`): when a concurrent
    // STOP from the same number won, the text is stored again with what it now
    // warrants (no second confirmation). Twice is enough: the second try sees the
    // number opted out and changes no consent.
    let mut tries = 0;
    loop {
        tries += 1;
        let now = state.clock.now();
        let (keyword_unit, answered) = match &practice {
            Some(practice) => {
                crate::sms::auth::unmatched(
                    state,
                    &sms.gateway,
                    practice,
                    from.expose(),
                    sms.body.expose(),
                    now,
                )
                .await?
            }
            None => (WriteUnit::new(), None),
        };
        let unit = receipt_unit(
            &sms.gateway,
            &sms.provider_message_id,
            EventOutcome::Unmatched,
            now,
            true,
        )
        .insert(unmatched_inbound::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            gateway: Set(sms.gateway.clone()),
            provider_message_id: Set(Some(sms.provider_message_id.clone())),
            from_phone: Set(from.expose().clone()),
            to_phone: Set(sms.to.expose().clone()),
            practice_id: Set(practice.as_ref().map(|p| p.id.clone())),
            body: Set(sms.body.expose().clone()),
            answered: Set(answered.map(str::to_owned)),
            received_at: Set(now),
        })
        .merge(keyword_unit);
        match state.writer.write(unit).await {
            Ok(()) => return Ok(EventOutcome::Unmatched),
            Err(error) if is_duplicate(&error) => return Ok(EventOutcome::Duplicate),
            Err(WriteError::Precondition(crate::sms::auth::NOT_YET_OPTED_OUT)) if tries < 3 => {}
            Err(error) => return Err(error.into()),
        }
    }
}

/// The practice of the SMS number `to` (active or not) and, in the same statement,
/// the id of the active patient pending or enabled on `from`, compared as given (at
/// most one). `None` when no practice has that number.
async fn practice_and_patient_on(
    db: &impl sea_orm::ConnectionTrait,
    to: &Phone,
    from: &Phone,
) -> Result<Option<(practice::Model, Option<String>)>, DbErr> {
    let values: Vec<sea_orm::Value> = vec![
        from.expose().clone().into(),
        SmsStatus::Pending.to_value().into(),
        SmsStatus::Enabled.to_value().into(),
        to.expose().clone().into(),
    ];
    let Some(row) = db
        .query_one_raw(crate::sql::statement(
            db.get_database_backend(),
            &PRACTICE_AND_PATIENT_ON_SQL,
            values,
        ))
        .await?
    else {
        return Ok(None);
    };
    let practice = practice::Model::from_query_result(&row, "pr_")?;
    let patient: Option<String> = row.try_get("", "on_number")?;
    Ok(Some((practice, patient)))
}

static PRACTICE_AND_PATIENT_ON_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let columns: Vec<String> = practice::Column::iter()
        .map(|c| format!("pr.{0} AS pr_{0}", c.as_str()))
        .collect();
    format!(
        "SELECT {}, (SELECT p.id FROM patients p WHERE p.practice_id = pr.id \
               AND p.mobile_phone = ? AND p.active = TRUE AND p.sms_status IN (?, ?) \
               LIMIT 1) AS on_number \
             FROM practice_sms_numbers n JOIN practices pr ON pr.id = n.practice_id \
             WHERE n.number = ?",
        columns.join(", ")
    )
});

/// `number` as E.164 in `country`, or as given when it does not parse.
fn normalise(number: &Phone, country: &str) -> Phone {
    crate::phone::country(country)
        .and_then(|region| crate::phone::parse_any(number.expose(), region).ok())
        .unwrap_or_else(|| number.clone())
}

/// Provider error codes that mean "the recipient opted out at the carrier" when a
/// status callback reports a failed delivery (Twilio's 21610).
pub const CARRIER_OPT_OUT_CODES: &[&str] = &["21610"];

/// The precondition of applying a parked receipt: it is still parked (another
/// applier did not take it first).
const STILL_PARKED: &str = "the receipt is still parked";

fn status_name(status: ReceiptStatus) -> &'static str {
    match status {
        ReceiptStatus::Sent => "sent",
        ReceiptStatus::Delivered => "delivered",
        ReceiptStatus::Failed => "failed",
        ReceiptStatus::Undelivered => "undelivered",
    }
}

fn status_named(name: &str) -> Option<ReceiptStatus> {
    Some(match name {
        "sent" => ReceiptStatus::Sent,
        "delivered" => ReceiptStatus::Delivered,
        "failed" => ReceiptStatus::Failed,
        "undelivered" => ReceiptStatus::Undelivered,
        _ => return None,
    })
}

/// The `inbound_receipts` key that deduplicates status callbacks: one per (provider
/// id, status).
fn receipt_key(provider_message_id: &str, status: ReceiptStatus) -> String {
    format!("receipt:{}:{provider_message_id}", status_name(status))
}

/// A delivery receipt: deduplicated by (provider id, status) — a replayed callback
/// changes nothing — then applied to the delivery with that provider id, or, when no
/// delivery carries the id yet (the send's outcome is not recorded yet), parked
/// until it does ([`apply_parked`]).
async fn receipt(
    state: &Shared,
    gateway: &str,
    provider_message_id: &str,
    status: ReceiptStatus,
    error_code: Option<String>,
) -> Result<EventOutcome, InboundError> {
    let key = receipt_key(provider_message_id, status);
    if seen(state, gateway, &key).await? {
        return Ok(EventOutcome::Duplicate);
    }
    let now = state.clock.now();
    let target = delivery_with(state, gateway, provider_message_id).await?;
    let Some(target) = target else {
        // Parked, with its dedup row; then looked for again, in case the send's
        // outcome landed in between (its recorder looks for parked receipts after
        // its own commit, so one of the two sees the other).
        let unit = receipt_unit(gateway, &key, EventOutcome::ReceiptParked, now, true)
            .insert_or_ignore(
                parked_receipt::ActiveModel {
                    gateway: Set(gateway.to_owned()),
                    provider_message_id: Set(provider_message_id.to_owned()),
                    status: Set(status_name(status).to_owned()),
                    error_code: Set(error_code),
                    received_at: Set(now),
                },
                &[
                    parked_receipt::Column::Gateway,
                    parked_receipt::Column::ProviderMessageId,
                    parked_receipt::Column::Status,
                ],
            );
        match state.writer.write(unit).await {
            Ok(()) => {}
            Err(error) if is_duplicate(&error) => return Ok(EventOutcome::Duplicate),
            Err(error) => return Err(error.into()),
        }
        tracing::debug!(%gateway, %provider_message_id, "A delivery receipt was parked: no delivery carries its provider id yet.");
        apply_parked(state, gateway, &[provider_message_id.to_owned()]).await?;
        return Ok(EventOutcome::ReceiptParked);
    };
    let dedup = receipt_unit(gateway, &key, EventOutcome::ReceiptApplied, now, true);
    match apply(state, gateway, &target, status, error_code, dedup).await {
        Ok(outcome) => Ok(outcome),
        Err(InboundError::Write(error)) if is_duplicate(&error) => Ok(EventOutcome::Duplicate),
        Err(error) => Err(error),
    }
}

/// The delivery of `gateway` that carries `provider_message_id`.
async fn delivery_with(
    state: &Shared,
    gateway: &str,
    provider_message_id: &str,
) -> Result<Option<delivery::Model>, DbErr> {
    delivery::Entity::find()
        .filter(delivery::Column::Gateway.eq(gateway))
        .filter(delivery::Column::ProviderMessageId.eq(provider_message_id))
        .one(&state.db)
        .await
}

/// Applies receipt `status` to `target`, moving it forward only, with `with` (the
/// receipt's dedup row, or the removal of its parked row) in the same unit. A failed
/// delivery whose code is a carrier opt-out ([`CARRIER_OPT_OUT_CODES`]) also opts
/// the delivery's number out of the delivery's practice — only that one — unless the
/// number's consent changed after the delivery was handed to the provider (a START
/// texted after the failed send wins).
async fn apply(
    state: &Shared,
    gateway: &str,
    target: &delivery::Model,
    status: ReceiptStatus,
    error_code: Option<String>,
    with: WriteUnit,
) -> Result<EventOutcome, InboundError> {
    use DeliveryStatus as S;
    let (to, before): (S, &[S]) = match status {
        ReceiptStatus::Sent => (S::Sent, &[S::Queued, S::Sending]),
        ReceiptStatus::Delivered => (S::Delivered, &[S::Queued, S::Sending, S::Sent]),
        ReceiptStatus::Failed => (S::Failed, &[S::Queued, S::Sending, S::Sent]),
        ReceiptStatus::Undelivered => (S::Undelivered, &[S::Queued, S::Sending, S::Sent]),
    };
    let now = state.clock.now();
    if !before.contains(&target.status) {
        tracing::debug!(%gateway, delivery_id = %target.id, "A delivery receipt was ignored: the delivery's status is already past it.");
        state.writer.write(with).await?;
        return Ok(EventOutcome::ReceiptIgnored);
    }
    let opted_out = matches!(to, S::Failed | S::Undelivered)
        && error_code
            .as_deref()
            .is_some_and(|code| CARRIER_OPT_OUT_CODES.contains(&code));
    let mut update = delivery::Entity::update_many()
        .col_expr(delivery::Column::Status, Expr::value(to))
        .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
        .filter(delivery::Column::Id.eq(target.id.as_str()))
        .filter(delivery::Column::Status.is_in(before.iter().copied()));
    if matches!(to, S::Failed | S::Undelivered) {
        let reason = match to {
            S::Failed => "The provider reports that it could not send the message.",
            _ => "The carrier reports that the message could not be delivered.",
        };
        update = update
            .col_expr(delivery::Column::ErrorCode, Expr::value(error_code))
            .col_expr(delivery::Column::ErrorReason, Expr::value(reason));
    }
    let mut unit = with.exec(update.into_query(), Expect::Any, "delivery receipt");
    let mut follow_up = None;
    if opted_out
        && target.channel == DeliveryChannel::Sms
        && let Some(phone) = &target.recipient
    {
        let consent = sms_consent::Entity::find_by_id((target.practice_id.clone(), phone.clone()))
            .one(&state.db)
            .await?;
        let sent_at = target.claimed_at.unwrap_or(target.created_at);
        if consent.is_some_and(|c| c.changed_at > sent_at) {
            tracing::info!(%gateway, delivery_id = %target.id, "A carrier opt-out report was not applied: the number's consent changed after the message was sent.");
        } else {
            unit = unit.merge(super::consent::number_opted_out(
                &target.practice_id,
                phone,
                now,
            ));
            follow_up = Some((target.practice_id.clone(), phone.clone()));
        }
    }
    state.writer.write(unit).await?;
    if let Some((practice_id, phone)) = follow_up {
        super::consent::follow_up_logged(state, gateway, &practice_id, &phone).await;
    }
    Ok(EventOutcome::ReceiptApplied)
}

/// Applies the receipts parked for `provider_ids` of `gateway` whose delivery now
/// carries the id: each in one unit with the removal of its parked row (guarded, so
/// of two appliers one applies it), in the order the provider reports progress.
pub async fn apply_parked(
    state: &Shared,
    gateway: &str,
    provider_ids: &[String],
) -> Result<(), InboundError> {
    for chunk in provider_ids.chunks(500) {
        let parked = parked_receipt::Entity::find()
            .filter(parked_receipt::Column::Gateway.eq(gateway))
            .filter(parked_receipt::Column::ProviderMessageId.is_in(chunk.iter().cloned()))
            .all(&state.db)
            .await?;
        let mut parked: Vec<(ReceiptStatus, parked_receipt::Model)> = parked
            .into_iter()
            .filter_map(|p| status_named(&p.status).map(|s| (s, p)))
            .collect();
        parked.sort_by_key(|(status, p)| {
            (
                p.provider_message_id.clone(),
                *status != ReceiptStatus::Sent,
            )
        });
        for (status, row) in parked {
            let Some(target) = delivery_with(state, gateway, &row.provider_message_id).await?
            else {
                continue;
            };
            let take = WriteUnit::new().exec(
                parked_receipt::Entity::delete_many()
                    .filter(parked_receipt::Column::Gateway.eq(gateway))
                    .filter(
                        parked_receipt::Column::ProviderMessageId
                            .eq(row.provider_message_id.as_str()),
                    )
                    .filter(parked_receipt::Column::Status.eq(row.status.as_str()))
                    .into_query(),
                Expect::Exactly(1),
                STILL_PARKED,
            );
            match apply(
                state,
                gateway,
                &target,
                status,
                row.error_code.clone(),
                take,
            )
            .await
            {
                Ok(_) => {}
                Err(InboundError::Write(WriteError::Precondition(STILL_PARKED))) => {}
                Err(error) => return Err(error),
            }
        }
    }
    Ok(())
}

/// Opts `number` out of every practice whose numbers `gateway` serves.
async fn opt_out(
    state: &Shared,
    gateway: &str,
    number: Phone,
) -> Result<EventOutcome, InboundError> {
    let practices: Vec<String> = practice_sms_number::Entity::find()
        .select_only()
        .column(practice_sms_number::Column::PracticeId)
        .distinct()
        .filter(practice_sms_number::Column::Gateway.eq(gateway))
        .into_tuple()
        .all(&state.db)
        .await?;
    let now = state.clock.now();
    let mut unit = WriteUnit::new();
    let mut numbers = Vec::new();
    for practice_id in practices {
        let Some(practice) = practice::Entity::find_by_id(practice_id)
            .one(&state.db)
            .await?
        else {
            continue;
        };
        let phone = normalise(&number, &practice.country).into_inner();
        unit = unit.merge(super::consent::number_opted_out(&practice.id, &phone, now));
        numbers.push((practice.id, phone));
    }
    state.writer.write(unit).await?;
    for (practice_id, phone) in numbers {
        super::consent::follow_up_logged(state, gateway, &practice_id, &phone).await;
    }
    Ok(EventOutcome::OptedOut)
}

/// The inbound task: commits events plugins emit outside webhook calls. When `stop`
/// is cancelled it takes no more and commits those already accepted.
pub(crate) async fn run_emitted(
    state: Shared,
    mut emitted: mpsc::Receiver<Emitted>,
    stop: CancellationToken,
) {
    let mut stopping = false;
    loop {
        let next = if stopping {
            emitted.recv().await
        } else {
            tokio::select! {
                next = emitted.recv() => next,
                () = stop.cancelled() => {
                    emitted.close();
                    stopping = true;
                    continue;
                }
            }
        };
        let Some(Emitted { instance, event }) = next else {
            break;
        };
        let Some(gateway) = state.gateways.instance(&instance).map(Arc::clone) else {
            tracing::error!(gateway = %instance, "An event came from an unknown gateway instance; it was dropped.");
            continue;
        };
        if let Err(error) = commit(&state, &gateway, vec![event]).await {
            tracing::error!(gateway = %instance, %error, "An event a gateway emitted could not be committed; it is lost.");
        }
    }
}
