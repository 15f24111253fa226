//! `sms_auth_attempts`: each date-of-birth reply to a session, without its text.

use sea_orm::entity::prelude::*;

/// One reply to session `session_id`. The reply's text is never stored.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "sms_auth_attempts")]
pub struct Model {
    /// UUIDv7.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub session_id: String,
    pub at: DateTimeUtc,
    /// `correct` or `wrong`.
    pub outcome: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::sms_auth_session::Entity",
        from = "Column::SessionId",
        to = "super::sms_auth_session::Column::Id"
    )]
    Session,
}

impl Related<super::sms_auth_session::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Session.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
