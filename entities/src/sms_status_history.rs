//! `sms_status_history`: every change of a patient's SMS status, oldest first.

use sea_orm::entity::prelude::*;

use crate::enums::SmsStatus;

/// Patient `patient_id`'s SMS status became `status` at `at`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "sms_status_history")]
pub struct Model {
    /// UUIDv7.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub patient_id: String,
    pub status: SmsStatus,
    /// A [`SmsStatusReason`](crate::enums::SmsStatusReason) name.
    pub reason: Option<String>,
    /// The session the change belongs to, if any.
    pub session_id: Option<String>,
    /// The staff user who caused it, if a user did.
    pub changed_by_user_id: Option<String>,
    pub at: DateTimeUtc,
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
        belongs_to = "super::sms_auth_session::Entity",
        from = "Column::SessionId",
        to = "super::sms_auth_session::Column::Id"
    )]
    Session,
    #[sea_orm(
        belongs_to = "super::user::Entity",
        from = "Column::ChangedByUserId",
        to = "super::user::Column::Id"
    )]
    ChangedBy,
}

impl Related<super::patient::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Patient.def()
    }
}

impl Related<super::sms_auth_session::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Session.def()
    }
}

impl Related<super::user::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::ChangedBy.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
