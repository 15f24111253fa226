//! `sms_consent`: SMS consent of a phone number towards one practice, whoever the patient.
//!
//! Once a number texts STOP (or the carrier reports it unsubscribed), nothing but the
//! single confirmation goes to it from that practice until it texts START. A staff
//! opt-out is about the patient, not the number, and is not recorded here.

use sea_orm::entity::prelude::*;

/// Consent of `phone` towards practice `practice_id`. No row means consent.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "sms_consent")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub practice_id: String,
    /// E.164 form.
    #[sea_orm(primary_key, auto_increment = false)]
    pub phone: String,
    pub opted_out: bool,
    /// A [`SmsStatusReason`](crate::enums::SmsStatusReason) name.
    pub reason: Option<String>,
    pub changed_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::practice::Entity",
        from = "Column::PracticeId",
        to = "super::practice::Column::Id"
    )]
    Practice,
}

impl Related<super::practice::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Practice.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
