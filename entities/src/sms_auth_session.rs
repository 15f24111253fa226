//! `sms_auth_sessions`: SMS authentication sessions ('Text Messages' button, or START).

use sea_orm::entity::prelude::*;

use crate::enums::SmsAuthStatus;

/// One attempt to enable SMS for patient `patient_id` on `phone`. At most one
/// `pending` session per patient; a newer one supersedes it.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "sms_auth_sessions")]
pub struct Model {
    /// UUIDv7.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub patient_id: String,
    pub practice_id: String,
    /// E.164 form.
    pub phone: String,
    pub status: SmsAuthStatus,
    /// Why it ended `failed` or `opted_out`: a
    /// [`SmsStatusReason`](crate::enums::SmsStatusReason) name.
    pub reason: Option<String>,
    /// Wrong date-of-birth replies so far; not reset by a resend.
    pub attempts: i32,
    /// The staff user who pressed the button; none after the patient's START.
    pub started_by_user_id: Option<String>,
    pub started_at: DateTimeUtc,
    /// When the newest opt-in text was sent; the window counts from it.
    pub last_sent_at: DateTimeUtc,
    pub expires_at: DateTimeUtc,
    pub ended_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::patient::Entity",
        from = "Column::PatientId",
        to = "super::patient::Column::Id"
    )]
    Patient,
    #[sea_orm(
        belongs_to = "super::practice::Entity",
        from = "Column::PracticeId",
        to = "super::practice::Column::Id"
    )]
    Practice,
    #[sea_orm(
        belongs_to = "super::user::Entity",
        from = "Column::StartedByUserId",
        to = "super::user::Column::Id"
    )]
    StartedBy,
    #[sea_orm(has_many = "super::sms_auth_attempt::Entity")]
    Attempts,
}

impl Related<super::patient::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Patient.def()
    }
}

impl Related<super::practice::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Practice.def()
    }
}

impl Related<super::user::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::StartedBy.def()
    }
}

impl Related<super::sms_auth_attempt::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Attempts.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
