//! Consent changes the gateways cause: a provider reporting that a number unsubscribed
//! (a `send` answered "unsubscribed", or an opt-out event).
//!
//! Two steps. First, with the event's own writes (the delivery's `failed`, say), the
//! number is opted out of the practice's texts ([`number_opted_out`]: an
//! `sms_consent` upsert, reason `carrier_unsubscribed`), so from that commit on no
//! claim hands anything but the opt-out confirmation to a plugin for it. Then each
//! patient of that practice pending or enabled on that number is told
//! ([`tell_patients`]): the patient's actor runs the SMS authentication's
//! `CarrierUnsubscribed` transition — status `opted_out` with the reason, the status
//! history, the pending session ended, the `system` message, the Two-Way Texting
//! notifications. A crash between the two steps leaves the number opted out (safe)
//! and the patient's status behind; the next unsubscribed report catches it up.

use caremsg_entities::{SmsStatus, SmsStatusReason, patient, sms_consent};
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QuerySelect};

use crate::actors::conversation::Sms;
use crate::sms::auth::SmsOp;
use crate::state::Shared;
use crate::writer::WriteUnit;

/// The write that opts `phone` (E.164) out of `practice_id`'s texts, as the
/// provider reported at `now`.
pub fn number_opted_out(practice_id: &str, phone: &str, now: DateTime<Utc>) -> WriteUnit {
    WriteUnit::new().upsert(
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

/// Tells each patient's actor that the carrier reports their number unsubscribed
/// (after [`number_opted_out`] committed). Failures are logged: the number stays
/// opted out either way.
pub async fn tell_patients(state: &Shared, gateway: &str, patients: &[String]) {
    for patient_id in patients {
        let told = state
            .conversations
            .send(
                patient_id,
                Sms {
                    client: format!("gateway:{gateway}"),
                    op: SmsOp::CarrierUnsubscribed,
                },
            )
            .await;
        match told {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::error!(%gateway, %patient_id, %error, "The carrier's unsubscribe could not be applied to the patient; the number is opted out.");
            }
            Err(error) => {
                tracing::error!(%gateway, %patient_id, %error, "The carrier's unsubscribe could not reach the patient's actor; the number is opted out.");
            }
        }
    }
}
