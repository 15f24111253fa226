//! `notifications`: staff notifications, sent at most once per (user, kind, subject).

use sea_orm::entity::prelude::*;

use crate::enums::{NotificationKind, SmsStatus};

/// A notification to user `user_id` about patient `patient_id`. The unique
/// (user, kind, subject) makes a repeat insert fail, also across crashes.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "notifications")]
pub struct Model {
    /// UUIDv7.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub user_id: String,
    pub patient_id: String,
    pub kind: NotificationKind,
    /// The patient message (`new_patient_message`), the unread streak (`unread_reminder`:
    /// conversation and oldest unviewed message) or the status change (`sms_status`).
    pub subject: String,
    /// The message notified about, or the oldest unviewed one.
    pub message_seq: Option<i64>,
    /// The new status (`sms_status`).
    pub sms_status: Option<SmsStatus>,
    pub created_at: DateTimeUtc,
    pub read_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::user::Entity",
        from = "Column::UserId",
        to = "super::user::Column::Id"
    )]
    User,
    #[sea_orm(
        belongs_to = "super::patient::Entity",
        from = "Column::PatientId",
        to = "super::patient::Column::Id"
    )]
    Patient,
    #[sea_orm(has_many = "super::delivery::Entity")]
    Deliveries,
}

impl Related<super::user::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::User.def()
    }
}

impl Related<super::patient::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Patient.def()
    }
}

impl Related<super::delivery::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Deliveries.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
