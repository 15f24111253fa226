//! `parked_receipts`: delivery receipts that arrived before their delivery's send outcome named the provider id, kept until it does.

use sea_orm::entity::prelude::*;

/// Receipt `status` for provider id `provider_message_id` of gateway `gateway`, not
/// yet applied: no delivery carried that id when it arrived. Applied (and removed)
/// when a send outcome records the id; pruned with the other operational tables.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "parked_receipts")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub gateway: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub provider_message_id: String,
    /// `sent`, `delivered`, `failed` or `undelivered`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub status: String,
    /// The provider's error code, when it failed.
    pub error_code: Option<String>,
    pub received_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
