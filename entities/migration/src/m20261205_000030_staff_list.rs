//! The staff patient list, index-backed (issue #15): each care-team row carries its
//! patient's newest activity, so "my patients, newest activity first" reads one page of
//! an index (`care_team_members (user_id, activity, patient_id)`) whatever the number of
//! patients on the user's care teams.
//!
//! `care_team_members.activity` is a copy of `conversations.last_message_at`, kept by
//! the database itself in the same statement that moves the conversation (a trigger),
//! so no write path can forget it and a message costs no extra statement:
//! - after `conversations.last_message_at` changes, every care-team row of that
//!   patient takes the new value;
//! - a care-team row inserted later takes the conversation's current value.
//!
//! The column is deliberately not in the `care_team_member` entity: inserts and
//! upserts from the entity never name it, so they can never overwrite it.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

const SQLITE_UP: &[&str] = &[
    "ALTER TABLE care_team_members ADD COLUMN activity timestamp_with_timezone_text NULL",
    "UPDATE care_team_members SET activity = (SELECT c.last_message_at FROM conversations c \
       WHERE c.patient_id = care_team_members.patient_id)",
    "CREATE INDEX idx_care_team_members_user_id_activity_patient_id \
       ON care_team_members (user_id, activity, patient_id)",
    "CREATE TRIGGER trg_conversations_activity AFTER UPDATE OF last_message_at ON conversations \
       WHEN NEW.last_message_at IS NOT OLD.last_message_at \
     BEGIN \
       UPDATE care_team_members SET activity = NEW.last_message_at WHERE patient_id = NEW.patient_id; \
     END",
    "CREATE TRIGGER trg_care_team_members_activity AFTER INSERT ON care_team_members \
     BEGIN \
       UPDATE care_team_members SET activity = (SELECT c.last_message_at FROM conversations c \
         WHERE c.patient_id = NEW.patient_id) \
       WHERE patient_id = NEW.patient_id AND user_id = NEW.user_id; \
     END",
];

const SQLITE_DOWN: &[&str] = &[
    "DROP TRIGGER IF EXISTS trg_care_team_members_activity",
    "DROP TRIGGER IF EXISTS trg_conversations_activity",
    "DROP INDEX IF EXISTS idx_care_team_members_user_id_activity_patient_id",
    "ALTER TABLE care_team_members DROP COLUMN activity",
];

const POSTGRES_UP: &[&str] = &[
    "ALTER TABLE care_team_members ADD COLUMN activity timestamp with time zone NULL",
    "UPDATE care_team_members ct SET activity = c.last_message_at FROM conversations c \
       WHERE c.patient_id = ct.patient_id",
    "CREATE INDEX idx_care_team_members_user_id_activity_patient_id \
       ON care_team_members (user_id, activity, patient_id)",
    "CREATE FUNCTION caremsg_conversation_activity() RETURNS trigger LANGUAGE plpgsql AS $$ \
     BEGIN \
       UPDATE care_team_members SET activity = NEW.last_message_at WHERE patient_id = NEW.patient_id; \
       RETURN NULL; \
     END $$",
    "CREATE TRIGGER trg_conversations_activity AFTER UPDATE OF last_message_at ON conversations \
       FOR EACH ROW WHEN (NEW.last_message_at IS DISTINCT FROM OLD.last_message_at) \
       EXECUTE FUNCTION caremsg_conversation_activity()",
    "CREATE FUNCTION caremsg_care_team_activity() RETURNS trigger LANGUAGE plpgsql AS $$ \
     BEGIN \
       NEW.activity := (SELECT c.last_message_at FROM conversations c WHERE c.patient_id = NEW.patient_id); \
       RETURN NEW; \
     END $$",
    "CREATE TRIGGER trg_care_team_members_activity BEFORE INSERT ON care_team_members \
       FOR EACH ROW EXECUTE FUNCTION caremsg_care_team_activity()",
];

const POSTGRES_DOWN: &[&str] = &[
    "DROP TRIGGER IF EXISTS trg_care_team_members_activity ON care_team_members",
    "DROP FUNCTION IF EXISTS caremsg_care_team_activity()",
    "DROP TRIGGER IF EXISTS trg_conversations_activity ON conversations",
    "DROP FUNCTION IF EXISTS caremsg_conversation_activity()",
    "DROP INDEX IF EXISTS idx_care_team_members_user_id_activity_patient_id",
    "ALTER TABLE care_team_members DROP COLUMN activity",
];

async fn run(manager: &SchemaManager<'_>, sqlite: &[&str], postgres: &[&str]) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let statements = match db.get_database_backend() {
        DbBackend::Postgres => postgres,
        _ => sqlite,
    };
    for sql in statements {
        db.execute_unprepared(sql).await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, SQLITE_UP, POSTGRES_UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, SQLITE_DOWN, POSTGRES_DOWN).await
    }
}
