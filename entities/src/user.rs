//! `users`: the staff members of a practice, kept in sync by the platform's admin API.

use sea_orm::entity::prelude::*;

/// A staff user. Its id is the platform's own id. Never deleted: `active` false hides it.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "users")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub practice_id: String,
    /// Display name; may be appended to outbound SMS (`practices.sign_outbound_sms`).
    pub name: String,
    /// Where email notifications go; none means in-app only.
    pub email: Option<String>,
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
    #[sea_orm(has_one = "super::notification_settings::Entity")]
    NotificationSettings,
    #[sea_orm(has_many = "super::user_program_restriction::Entity")]
    ProgramRestrictions,
    #[sea_orm(has_many = "super::care_team_member::Entity")]
    CareTeamMembers,
    #[sea_orm(has_many = "super::notification::Entity")]
    Notifications,
    #[sea_orm(has_many = "super::message::Entity")]
    AuthoredMessages,
}

impl Related<super::practice::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Practice.def()
    }
}

impl Related<super::notification_settings::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::NotificationSettings.def()
    }
}

impl Related<super::user_program_restriction::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::ProgramRestrictions.def()
    }
}

impl Related<super::care_team_member::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::CareTeamMembers.def()
    }
}

impl Related<super::notification::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Notifications.def()
    }
}

impl Related<super::message::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::AuthoredMessages.def()
    }
}

/// The patients in whose Care Team panel the user is (as member or notification user).
impl Related<super::patient::Entity> for Entity {
    fn to() -> RelationDef {
        super::care_team_member::Relation::Patient.def()
    }

    fn via() -> Option<RelationDef> {
        Some(super::care_team_member::Relation::User.def().rev())
    }
}

impl ActiveModelBehavior for ActiveModel {}
