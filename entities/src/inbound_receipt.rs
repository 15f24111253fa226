//! `inbound_receipts`: the inbound messages already taken in, so a provider's retry is recognised.

use sea_orm::entity::prelude::*;

/// Inbound message `provider_message_id` from gateway `gateway` was stored.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "inbound_receipts")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub gateway: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub provider_message_id: String,
    pub received_at: DateTimeUtc,
    /// What was done with it, such as `message`, `keyword` or `unmatched`.
    pub outcome: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
