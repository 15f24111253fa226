//! `audit_log`: who read or sent what, for which patient, when and through which API client.
//!
//! **Append-only.** caremsg inserts rows and never updates or deletes them.
//! `patient_id` deliberately has no foreign key, so an entry survives anything that
//! happens to the records it names. Ids are UUIDv7, so they sort by time.

use sea_orm::entity::prelude::*;

/// One audited action.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_log")]
pub struct Model {
    /// UUIDv7 (time-ordered).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub at: DateTimeUtc,
    /// The API client's configured name.
    pub client: String,
    pub actor_user_id: Option<String>,
    pub patient_id: Option<String>,
    /// What was done, such as `conversation.read` or `message.send`.
    pub action: String,
    /// Further detail; never PHI beyond ids.
    #[sea_orm(column_type = "Text", nullable)]
    pub detail: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
