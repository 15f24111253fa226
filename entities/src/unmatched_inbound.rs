//! `unmatched_inbound`: texts from numbers not pending or enabled for any patient, kept for operators.

use sea_orm::entity::prelude::*;

/// One unmatched inbound text.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "unmatched_inbound")]
pub struct Model {
    /// UUIDv7.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub gateway: String,
    pub provider_message_id: Option<String>,
    /// E.164 form.
    pub from_phone: String,
    /// The practice number it was sent to, E.164 form.
    pub to_phone: String,
    /// The practice owning `to_phone`, if known.
    pub practice_id: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub body: String,
    /// The answer sent, if any (such as `opt_out_confirmation` or `help`).
    pub answered: Option<String>,
    pub received_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
