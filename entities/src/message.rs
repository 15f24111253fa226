//! `messages`: every message of every conversation, whatever the channel, in one order.

use sea_orm::entity::prelude::*;

use crate::enums::{Channel, Direction};

/// One message (or system event) of the conversation of patient `patient_id`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "messages")]
pub struct Model {
    /// UUIDv7.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The conversation (`conversations.patient_id`).
    pub patient_id: String,
    /// Position in the conversation, from 1; unique per conversation.
    pub seq: i64,
    pub direction: Direction,
    pub channel: Channel,
    /// The staff author of a `to_patient` message.
    pub author_user_id: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub body: String,
    /// Idempotency key of a client-supplied transaction id, scoped to the author;
    /// unique per conversation.
    pub client_txn_key: Option<String>,
    /// The SMS gateway instance an inbound text came through.
    pub gateway: Option<String>,
    /// The provider's id of an inbound text; unique per gateway.
    pub provider_message_id: Option<String>,
    /// The text looked like an opt-out without being an exact keyword.
    pub possible_opt_out: bool,
    /// When the patient marked the conversation read past this message (staff
    /// messages only; set once).
    pub read_by_patient_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::conversation::Entity",
        from = "Column::PatientId",
        to = "super::conversation::Column::PatientId"
    )]
    Conversation,
    #[sea_orm(
        belongs_to = "super::user::Entity",
        from = "Column::AuthorUserId",
        to = "super::user::Column::Id"
    )]
    Author,
    #[sea_orm(has_many = "super::delivery::Entity")]
    Deliveries,
}

impl Related<super::conversation::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Conversation.def()
    }
}

impl Related<super::user::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Author.def()
    }
}

impl Related<super::delivery::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Deliveries.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
