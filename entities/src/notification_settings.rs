//! `notification_settings`: one user's notification settings and their channels.
//!
//! A missing row means the defaults: New Patient Message on (in-app), Unread Message
//! Reminder off, Two-Way Texting off. `unread_reminder` may be true only while
//! `new_patient_message` is true (the API enforces it).

use sea_orm::entity::prelude::*;

/// The settings of user `user_id`: three switches, each with an in-app and an email channel.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "notification_settings")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub user_id: String,
    pub new_patient_message: bool,
    pub unread_reminder: bool,
    pub two_way_texting: bool,
    pub new_patient_message_in_app: bool,
    pub new_patient_message_email: bool,
    pub unread_reminder_in_app: bool,
    pub unread_reminder_email: bool,
    pub two_way_texting_in_app: bool,
    pub two_way_texting_email: bool,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::user::Entity",
        from = "Column::UserId",
        to = "super::user::Column::Id"
    )]
    User,
}

impl Related<super::user::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::User.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
