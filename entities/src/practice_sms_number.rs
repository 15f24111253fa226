//! `practice_sms_numbers`: the SMS sending numbers of a practice and the gateway that owns each.

use sea_orm::entity::prelude::*;

/// One sending number. An inbound text to this number belongs to this practice.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "practice_sms_numbers")]
pub struct Model {
    /// The number in E.164 form.
    #[sea_orm(primary_key, auto_increment = false)]
    pub number: String,
    pub practice_id: String,
    /// Name of the SMS gateway instance (in the config) that sends from this number.
    pub gateway: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::practice::Entity",
        from = "Column::PracticeId",
        to = "super::practice::Column::Id"
    )]
    Practice,
}

impl Related<super::practice::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Practice.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
