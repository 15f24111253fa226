//! `conversations`: the one conversation of each patient, and its sequence counter.

use sea_orm::entity::prelude::*;

/// The conversation of patient `patient_id`. Messages are numbered 1, 2, 3, ... by
/// `seq`; `last_seq` is the newest number given (0 while empty), advanced in the same
/// transaction as the message insert.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "conversations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub patient_id: String,
    /// The patient's practice, copied here for the practice-wide index.
    pub practice_id: String,
    pub last_seq: i64,
    pub last_message_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
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
    #[sea_orm(has_many = "super::message::Entity")]
    Messages,
    #[sea_orm(has_many = "super::read_marker::Entity")]
    ReadMarkers,
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

impl Related<super::message::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Messages.def()
    }
}

impl Related<super::read_marker::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::ReadMarkers.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
