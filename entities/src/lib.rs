//! caremsg's database model: one sea-orm entity module per table, driver-free.
//!
//! The schema itself is made by the migrations in `caremsg-migration`; these entities
//! must match it (its tests insert and read back rows through them on SQLite and on
//! PostgreSQL). Entities are the storage model, never API types.
//!
//! Conventions, the same for every table:
//! - Primary keys are strings: the platform's own ids for records it owns (practices,
//!   programs, users, patients), UUIDv7 strings for ids caremsg generates.
//! - Timestamps are `DateTime<Utc>`; PostgreSQL keeps microseconds, so values are
//!   truncated to microseconds before they are stored if they must compare equal
//!   when read back on both back ends.
//! - Closed sets of values are string-backed enums ([`enums`]), never database-native enums.
//! - Records are deactivated (`active`), not deleted; foreign keys do not cascade.

pub mod enums;
pub mod prelude;

pub mod audit_log;
pub mod care_team_member;
pub mod conversation;
pub mod delivery;
pub mod inbound_receipt;
pub mod message;
pub mod notification;
pub mod notification_settings;
pub mod parked_receipt;
pub mod patient;
pub mod patient_program;
pub mod practice;
pub mod practice_sms_number;
pub mod program;
pub mod read_marker;
pub mod sms_auth_attempt;
pub mod sms_auth_session;
pub mod sms_consent;
pub mod sms_status_history;
pub mod timer;
pub mod unmatched_inbound;
pub mod user;
pub mod user_program_restriction;

pub use enums::{
    CareTeamRole, Channel, DeliveryChannel, DeliveryPurpose, DeliveryStatus, Direction,
    NotificationKind, SmsAuthStatus, SmsStatus, SmsStatusReason, TimerKind,
};

/// Every table of the model, in creation order: each table comes after the tables
/// its foreign keys reference (so deleting in reverse order never violates one).
pub fn all_tables() -> &'static [&'static str] {
    &[
        "practices",
        "practice_sms_numbers",
        "programs",
        "users",
        "user_program_restrictions",
        "notification_settings",
        "patients",
        "patient_programs",
        "care_team_members",
        "conversations",
        "messages",
        "notifications",
        "deliveries",
        "read_markers",
        "sms_auth_sessions",
        "sms_auth_attempts",
        "sms_status_history",
        "sms_consent",
        "timers",
        "audit_log",
        "inbound_receipts",
        "unmatched_inbound",
        "parked_receipts",
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::EntityName;

    #[test]
    fn all_tables_names_every_entity_once() {
        let mut entities = vec![
            practice::Entity.table_name(),
            practice_sms_number::Entity.table_name(),
            program::Entity.table_name(),
            user::Entity.table_name(),
            user_program_restriction::Entity.table_name(),
            notification_settings::Entity.table_name(),
            patient::Entity.table_name(),
            patient_program::Entity.table_name(),
            care_team_member::Entity.table_name(),
            conversation::Entity.table_name(),
            message::Entity.table_name(),
            delivery::Entity.table_name(),
            read_marker::Entity.table_name(),
            sms_auth_session::Entity.table_name(),
            sms_auth_attempt::Entity.table_name(),
            sms_status_history::Entity.table_name(),
            sms_consent::Entity.table_name(),
            timer::Entity.table_name(),
            notification::Entity.table_name(),
            audit_log::Entity.table_name(),
            inbound_receipt::Entity.table_name(),
            unmatched_inbound::Entity.table_name(),
            parked_receipt::Entity.table_name(),
        ];
        let mut tables = all_tables().to_vec();
        entities.sort_unstable();
        tables.sort_unstable();
        assert_eq!(entities, tables);
        tables.dedup();
        assert_eq!(tables.len(), all_tables().len());
    }

    #[test]
    fn every_module_starts_with_a_doc_line() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                assert!(
                    text.starts_with("//! "),
                    "{} lacks a `//!` line",
                    path.display()
                );
                seen += 1;
            }
        }
        assert!(
            seen > all_tables().len(),
            "read only {seen} files in {}",
            dir.display()
        );
    }
}
