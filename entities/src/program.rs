//! `programs`: the care programs of a practice (CCM, RPM, BHI, PCM, ...).

use sea_orm::entity::prelude::*;

/// A care program. Its id is the platform's own id.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "programs")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub practice_id: String,
    pub name: String,
    pub active: bool,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::practice::Entity",
        from = "Column::PracticeId",
        to = "super::practice::Column::Id"
    )]
    Practice,
    #[sea_orm(has_many = "super::patient_program::Entity")]
    PatientPrograms,
    #[sea_orm(has_many = "super::user_program_restriction::Entity")]
    UserProgramRestrictions,
}

impl Related<super::practice::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Practice.def()
    }
}

impl Related<super::patient_program::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::PatientPrograms.def()
    }
}

impl Related<super::user_program_restriction::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::UserProgramRestrictions.def()
    }
}

/// The patients enrolled in the program.
impl Related<super::patient::Entity> for Entity {
    fn to() -> RelationDef {
        super::patient_program::Relation::Patient.def()
    }

    fn via() -> Option<RelationDef> {
        Some(super::patient_program::Relation::Program.def().rev())
    }
}

impl ActiveModelBehavior for ActiveModel {}
