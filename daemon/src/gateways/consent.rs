//! Consent changes the gateways cause: a provider reporting that a number unsubscribed
//! (a `send` answered "unsubscribed", or an opt-out event). Consent belongs to the
//! number, per practice (`sms_consent`); the patients of that practice on that number
//! who were pending or enabled become `opted_out` with reason `carrier_unsubscribed`.
//!
//! **Hook for SMS authentication:** [`carrier_opt_out`] is the one place a
//! provider-reported opt-out is turned into writes. The SMS authentication work adds
//! to the unit it builds what a status change also needs there — ending the patient's
//! pending session, the `system` message in the conversation, the Two-Way Texting
//! notifications — using the [`OptedOut::patients`] it returns.

use caremsg_entities::{SmsStatus, SmsStatusReason, patient, sms_consent, sms_status_history};
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryTrait};

use crate::writer::{Expect, WriteUnit};

/// What [`carrier_opt_out`] will change.
#[derive(Debug)]
pub struct OptedOut {
    /// The writes: consent, patients' statuses and their history.
    pub unit: WriteUnit,
    /// The patients whose status becomes `opted_out`.
    pub patients: Vec<String>,
}

/// The writes that record that `phone` (E.164) unsubscribed from `practice_id`'s texts,
/// as reported by the provider, at `now`.
pub async fn carrier_opt_out(
    db: &impl ConnectionTrait,
    practice_id: &str,
    phone: &str,
    now: DateTime<Utc>,
) -> Result<OptedOut, DbErr> {
    let reason = SmsStatusReason::CarrierUnsubscribed.as_str();
    let reachable = [SmsStatus::Pending, SmsStatus::Enabled];
    let patients: Vec<String> = patient::Entity::find()
        .filter(patient::Column::PracticeId.eq(practice_id))
        .filter(patient::Column::MobilePhone.eq(phone))
        .filter(patient::Column::SmsStatus.is_in(reachable))
        .all(db)
        .await?
        .into_iter()
        .map(|p| p.id)
        .collect();
    let mut unit = WriteUnit::new().upsert(
        sms_consent::ActiveModel {
            practice_id: Set(practice_id.to_owned()),
            phone: Set(phone.to_owned()),
            opted_out: Set(true),
            reason: Set(Some(reason.to_owned())),
            changed_at: Set(now),
        },
        &[sms_consent::Column::PracticeId, sms_consent::Column::Phone],
    );
    for id in &patients {
        unit = unit.insert(sms_status_history::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            patient_id: Set(id.clone()),
            status: Set(SmsStatus::OptedOut),
            reason: Set(Some(reason.to_owned())),
            session_id: Set(None),
            changed_by_user_id: Set(None),
            at: Set(now),
        });
    }
    if !patients.is_empty() {
        unit = unit.exec(
            patient::Entity::update_many()
                .col_expr(patient::Column::SmsStatus, Expr::value(SmsStatus::OptedOut))
                .col_expr(patient::Column::SmsStatusReason, Expr::value(reason))
                .col_expr(patient::Column::UpdatedAt, Expr::value(now))
                .filter(patient::Column::Id.is_in(patients.clone()))
                .filter(patient::Column::SmsStatus.is_in(reachable))
                .into_query(),
            Expect::Any,
            "patients opted out by the carrier",
        );
    }
    Ok(OptedOut { unit, patients })
}
