//! `read_markers`: how far each reader has read each conversation.

use sea_orm::entity::prelude::*;

/// Reader `reader` has read the conversation of patient `patient_id` up to `last_read_seq`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "read_markers")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub patient_id: String,
    /// `"user:<user id>"` for a staff user, `"patient"` for the patient (portal).
    #[sea_orm(primary_key, auto_increment = false)]
    pub reader: String,
    pub last_read_seq: i64,
    pub read_at: DateTimeUtc,
}

impl Model {
    /// The `reader` value of a staff user.
    pub fn user_reader(user_id: &str) -> String {
        format!("{READER_USER_PREFIX}{user_id}")
    }
}

/// Prefix of a staff user's `reader` value.
pub const READER_USER_PREFIX: &str = "user:";

/// The `reader` value of the patient.
pub const READER_PATIENT: &str = "patient";

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::conversation::Entity",
        from = "Column::PatientId",
        to = "super::conversation::Column::PatientId"
    )]
    Conversation,
}

impl Related<super::conversation::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Conversation.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
