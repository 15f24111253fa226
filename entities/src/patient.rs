//! `patients`: the patients of a practice, kept in sync by the platform's admin API.

use sea_orm::entity::prelude::*;

use crate::enums::SmsStatus;

/// A patient. Its id is the platform's own id. Never deleted: a DELETE sets `active`
/// false, which hides the patient everywhere and keeps its messages (record retention).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "patients")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub practice_id: String,
    pub first_name: String,
    pub last_name: String,
    /// `"first last"` lower-cased, for case-insensitive word-prefix search.
    pub search_name: String,
    pub date_of_birth: Date,
    /// E.164 form.
    pub mobile_phone: Option<String>,
    pub portal_enrolled: bool,
    pub sms_status: SmsStatus,
    /// Why the status is `failed` or `opted_out`: a
    /// [`SmsStatusReason`](crate::enums::SmsStatusReason) name.
    pub sms_status_reason: Option<String>,
    /// Time of the newest conversation message; orders the patient list.
    pub last_activity_at: Option<DateTimeUtc>,
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
    #[sea_orm(has_one = "super::conversation::Entity")]
    Conversation,
    #[sea_orm(has_many = "super::patient_program::Entity")]
    PatientPrograms,
    #[sea_orm(has_many = "super::care_team_member::Entity")]
    CareTeamMembers,
    #[sea_orm(has_many = "super::sms_auth_session::Entity")]
    SmsAuthSessions,
    #[sea_orm(has_many = "super::sms_status_history::Entity")]
    SmsStatusHistory,
    #[sea_orm(has_many = "super::notification::Entity")]
    Notifications,
}

impl Related<super::practice::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Practice.def()
    }
}

impl Related<super::conversation::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Conversation.def()
    }
}

impl Related<super::patient_program::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::PatientPrograms.def()
    }
}

impl Related<super::care_team_member::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::CareTeamMembers.def()
    }
}

impl Related<super::sms_auth_session::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::SmsAuthSessions.def()
    }
}

impl Related<super::sms_status_history::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::SmsStatusHistory.def()
    }
}

impl Related<super::notification::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Notifications.def()
    }
}

/// The programs the patient is enrolled in.
impl Related<super::program::Entity> for Entity {
    fn to() -> RelationDef {
        super::patient_program::Relation::Program.def()
    }

    fn via() -> Option<RelationDef> {
        Some(super::patient_program::Relation::Patient.def().rev())
    }
}

/// The users in the patient's Care Team panel (members and notification users).
impl Related<super::user::Entity> for Entity {
    fn to() -> RelationDef {
        super::care_team_member::Relation::User.def()
    }

    fn via() -> Option<RelationDef> {
        Some(super::care_team_member::Relation::Patient.def().rev())
    }
}

impl ActiveModelBehavior for ActiveModel {}
