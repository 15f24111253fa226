//! `practices`: a clinic account, kept in sync by the platform's admin API.

use sea_orm::entity::prelude::*;

/// A practice. Its id is the platform's own id. Never deleted: `active` false hides it.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "practices")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// Display name, used verbatim in texts.
    pub name: String,
    /// The practice offers SMS (the 'Text Messages' button).
    pub sms_enabled: bool,
    /// The practice offers portal chat ('Chat With My Care Team').
    pub portal_enabled: bool,
    /// ISO 3166-1 alpha-2 code; the default region when parsing phone numbers.
    pub country: String,
    /// IANA time zone name, such as `America/New_York`.
    pub timezone: String,
    /// Append the sender's display name to outbound SMS (off by default).
    pub sign_outbound_sms: bool,
    pub active: bool,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::practice_sms_number::Entity")]
    SmsNumbers,
    #[sea_orm(has_many = "super::program::Entity")]
    Programs,
    #[sea_orm(has_many = "super::user::Entity")]
    Users,
    #[sea_orm(has_many = "super::patient::Entity")]
    Patients,
}

impl Related<super::practice_sms_number::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::SmsNumbers.def()
    }
}

impl Related<super::program::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Programs.def()
    }
}

impl Related<super::user::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Users.def()
    }
}

impl Related<super::patient::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Patients.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
