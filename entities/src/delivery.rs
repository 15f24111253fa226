//! `deliveries`: the transactional outbox; every text or email caremsg sends is a row here first.
//!
//! A delivery is stored in the same transaction as what it delivers, then claimed by a
//! gateway actor (`status` `sending`, `claimed_at`), sent, and marked with the
//! provider's id or error. Consent is checked at claim time. A `sending` row found
//! after a crash becomes `reconcile`, never blindly re-sent.

use sea_orm::entity::prelude::*;

use crate::enums::{DeliveryChannel, DeliveryPurpose, DeliveryStatus};

/// One outbound delivery on one channel.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "deliveries")]
pub struct Model {
    /// UUIDv7; also the idempotency key given to providers that take one.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The conversation message delivered (purpose `message`).
    pub message_id: Option<String>,
    /// The staff notification delivered (purpose `notification`).
    pub notification_id: Option<String>,
    pub patient_id: Option<String>,
    pub practice_id: String,
    pub channel: DeliveryChannel,
    pub purpose: DeliveryPurpose,
    /// Name of the gateway instance that sends it.
    pub gateway: Option<String>,
    /// E.164 phone number or email address.
    pub recipient: Option<String>,
    /// The practice's sending number (SMS).
    pub from_number: Option<String>,
    /// Email subject.
    pub subject: Option<String>,
    /// The text, when it is not a conversation message's body.
    #[sea_orm(column_type = "Text", nullable)]
    pub body: Option<String>,
    pub status: DeliveryStatus,
    pub attempts: i32,
    /// When the row is next due to be claimed.
    pub next_attempt_at: DateTimeUtc,
    pub claimed_at: Option<DateTimeUtc>,
    /// The provider's id once sent; unique per gateway (delivery receipts look it up).
    pub provider_message_id: Option<String>,
    pub error_code: Option<String>,
    pub error_reason: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::message::Entity",
        from = "Column::MessageId",
        to = "super::message::Column::Id"
    )]
    Message,
    #[sea_orm(
        belongs_to = "super::notification::Entity",
        from = "Column::NotificationId",
        to = "super::notification::Column::Id"
    )]
    Notification,
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
}

impl Related<super::message::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Message.def()
    }
}

impl Related<super::notification::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Notification.def()
    }
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

impl ActiveModelBehavior for ActiveModel {}
