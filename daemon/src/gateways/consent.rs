//! Consent changes the gateways cause: a provider reporting that a number unsubscribed
//! (a `send` answered "unsubscribed", a status callback's carrier opt-out, or an
//! opt-out event).
//!
//! Two steps, made atomic by a durable follow-up. First, with the event's own writes
//! (the delivery's `failed`, say), the number is opted out of the practice's texts
//! ([`number_opted_out`]: an `sms_consent` upsert, reason `carrier_unsubscribed`), so
//! from that commit on no claim hands anything but the opt-out confirmation to a
//! plugin for it — and, in the same unit, a `carrier_opt_out` timer is armed, due at
//! once, naming the practice and the number. Then [`follow_up`] tells each patient
//! of that practice pending or enabled on that number: the patient's actor runs the
//! SMS authentication's `CarrierUnsubscribed` transition — status `opted_out` with the
//! reason, the status history, the pending session ended, the `system` message, the
//! Two-Way Texting notifications — and, once every patient is told, fires the timer.
//! A crash between the two steps leaves the timer due: the timer service runs the
//! follow-up at start ([`handler`]), so no patient stays `enabled` on a number the
//! carrier reported unsubscribed. The transition is idempotent (an opted-out patient
//! is left as is), so a follow-up run twice changes nothing the second time.

use std::sync::Arc;

use caremsg_entities::{SmsStatus, SmsStatusReason, TimerKind, patient, sms_consent};
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QuerySelect};

use crate::actors::conversation::Sms;
use crate::phi::Phi;
use crate::sms::auth::SmsOp;
use crate::state::Shared;
use crate::timers::{self, FireOutcome, TimerError, TimerHandler};
use crate::writer::WriteUnit;

/// The timer kind of the follow-up.
pub const FOLLOW_UP: TimerKind = TimerKind::CarrierOptOut;

/// The follow-up timer's subject: `{practice_id}/{phone}` (E.164 holds no '/').
fn subject(practice_id: &str, phone: &str) -> String {
    format!("{practice_id}/{phone}")
}

/// The write that opts `phone` (E.164) out of `practice_id`'s texts, as the
/// provider reported at `now`, with its durable follow-up (see the module's
/// documentation).
pub fn number_opted_out(practice_id: &str, phone: &str, now: DateTime<Utc>) -> WriteUnit {
    WriteUnit::new()
        .upsert(
            sms_consent::ActiveModel {
                practice_id: Set(practice_id.to_owned()),
                phone: Set(phone.to_owned()),
                opted_out: Set(true),
                reason: Set(Some(
                    SmsStatusReason::CarrierUnsubscribed.as_str().to_owned(),
                )),
                changed_at: Set(now),
            },
            &[sms_consent::Column::PracticeId, sms_consent::Column::Phone],
        )
        .merge(timers::arm(
            FOLLOW_UP,
            &subject(practice_id, phone),
            now,
            now,
        ))
}

/// The active patients of `practice_id` pending or enabled on `phone`.
pub async fn patients_on(
    db: &impl ConnectionTrait,
    practice_id: &str,
    phone: &str,
) -> Result<Vec<String>, DbErr> {
    patient::Entity::find()
        .select_only()
        .column(patient::Column::Id)
        .filter(patient::Column::PracticeId.eq(practice_id))
        .filter(patient::Column::MobilePhone.eq(phone))
        .filter(patient::Column::Active.eq(true))
        .filter(patient::Column::SmsStatus.is_in([SmsStatus::Pending, SmsStatus::Enabled]))
        .into_tuple()
        .all(db)
        .await
}

/// The second step, after [`number_opted_out`] committed: tells each patient of
/// `practice_id` pending or enabled on `phone` that the carrier reports the number
/// unsubscribed, then fires the follow-up timer. Whatever fails leaves the timer due
/// (the timer service tries again, backing off); the number stays opted out.
pub async fn follow_up(
    state: &Shared,
    client: &str,
    practice_id: &str,
    phone: &str,
) -> Result<FireOutcome, TimerError> {
    let patients = patients_on(&state.db, practice_id, phone).await?;
    if !tell_patients(state, client, phone, &patients).await {
        return Err(TimerError::Handler(
            "a patient's actor did not take the carrier's opt-out".to_owned(),
        ));
    }
    let now = state.clock.now();
    Ok(timers::fire_with(
        &state.writer,
        FOLLOW_UP,
        &subject(practice_id, phone),
        now,
        WriteUnit::new(),
    )
    .await?)
}

/// [`follow_up`], logging a failure (the timer keeps the work).
pub async fn follow_up_logged(state: &Shared, client: &str, practice_id: &str, phone: &str) {
    if let Err(error) = follow_up(state, client, practice_id, phone).await {
        tracing::warn!(%client, %practice_id, %error, "A carrier opt-out's patients could not all be told yet; the timer service tries again.");
    }
}

/// The timer service's handler of due `carrier_opt_out` timers: a follow-up that a
/// crash (or a failure) interrupted.
pub fn handler(state: &Shared) -> Arc<dyn TimerHandler> {
    let weak = Arc::downgrade(state);
    timers::handler_fn(
        move |timer: caremsg_entities::timer::Model, _now: DateTime<Utc>| {
            let weak = weak.clone();
            async move {
                let state = weak.upgrade().ok_or(TimerError::Stopped)?;
                let Some((practice_id, phone)) = timer.subject.rsplit_once('/') else {
                    // Not a subject this kind makes: nothing to follow up.
                    let now = state.clock.now();
                    return Ok(timers::fire_with(
                        &state.writer,
                        FOLLOW_UP,
                        &timer.subject,
                        now,
                        WriteUnit::new(),
                    )
                    .await?);
                };
                follow_up(&state, "timer", practice_id, phone).await
            }
        },
    )
}

/// Tells each patient's actor that the carrier reports `phone`, their number,
/// unsubscribed (after [`number_opted_out`] committed); a patient whose number has
/// changed since is left as is. Returns whether every patient took it; failures are
/// logged.
pub async fn tell_patients(state: &Shared, client: &str, phone: &str, patients: &[String]) -> bool {
    let mut all = true;
    for patient_id in patients {
        let told = state
            .conversations
            .send(
                patient_id,
                Sms {
                    client: format!("gateway:{client}"),
                    op: SmsOp::CarrierUnsubscribed {
                        phone: Phi::new(phone.to_owned()),
                    },
                },
            )
            .await;
        match told {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                all = false;
                tracing::error!(%client, %patient_id, %error, "The carrier's unsubscribe could not be applied to the patient; the number is opted out.");
            }
            Err(error) => {
                all = false;
                tracing::error!(%client, %patient_id, %error, "The carrier's unsubscribe could not reach the patient's actor; the number is opted out.");
            }
        }
    }
    all
}
