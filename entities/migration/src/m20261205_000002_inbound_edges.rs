//! Issue #13's schema: what keeps every patient text and makes STOP absolute.
//!
//! - `timers` gets real columns for what a subject names (`patient_id`, `user_id`,
//!   `seq`), so "every timer of patient X" is an equality match, and the columns of
//!   failure back-off (`attempts`, `dead`). Existing rows are moved: a session window
//!   takes its session's patient; an unread reminder's subject
//!   `{patient}/{user}/{seq}` is split where its patient and user exist (ids may
//!   contain '/').
//! - `patients` gets a partial unique index: one active patient `pending` or
//!   `enabled` per (practice, mobile number). Rows that break it today (only a race
//!   could make them) are resolved first: the most recently changed patient keeps
//!   the number, the others become `failed` with reason `phone_in_use`.
//! - `parked_receipts` keeps a delivery receipt that arrived before its send outcome
//!   named the provider id, until that id lands.
//! - Indexes for pruning (`inbound_receipts.received_at`, `timers (fired, fired_at)`)
//!   and for the metrics' oldest-queued-delivery figure (`deliveries (status,
//!   created_at)`: the oldest queued row is the index's first, not a sort).
//!
//! Like every migration, this file is history: once released it never changes.

use sea_orm_migration::sea_orm::{ConnectionTrait, Statement};
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The partial unique index of rule 6 (written as SQL: the same text on both back
/// ends; sea-query's index builder has no `WHERE`).
const ONE_PATIENT_PER_NUMBER: &str = "CREATE UNIQUE INDEX ux_patients_sms_number \
     ON patients (practice_id, mobile_phone) \
     WHERE active AND sms_status IN ('pending', 'enabled')";

/// Older duplicates of rule 6 become `failed` (`phone_in_use`).
const RESOLVE_DUPLICATES: &str = "UPDATE patients SET sms_status = 'failed', \
     sms_status_reason = 'phone_in_use' \
     WHERE active AND sms_status IN ('pending', 'enabled') AND mobile_phone IS NOT NULL \
     AND EXISTS (SELECT 1 FROM patients o WHERE o.practice_id = patients.practice_id \
     AND o.mobile_phone = patients.mobile_phone AND o.active \
     AND o.sms_status IN ('pending', 'enabled') \
     AND (o.updated_at > patients.updated_at \
     OR (o.updated_at = patients.updated_at AND o.id > patients.id)))";

/// A session window's patient is its session's.
const WINDOW_PATIENTS: &str = "UPDATE timers SET patient_id = \
     (SELECT s.patient_id FROM sms_auth_sessions s WHERE s.id = timers.subject) \
     WHERE kind = 'sms_auth_window'";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite takes one column per ALTER TABLE.
        let columns = [
            string_null(Timers::PatientId),
            string_null(Timers::UserId),
            big_integer_null(Timers::Seq),
            integer(Timers::Attempts).default(0).to_owned(),
            boolean(Timers::Dead).default(false).to_owned(),
        ];
        for mut column in columns {
            manager
                .alter_table(
                    Table::alter()
                        .table(Timers::Table)
                        .add_column(&mut column)
                        .to_owned(),
                )
                .await?;
        }
        let db = manager.get_connection();
        db.execute_unprepared(WINDOW_PATIENTS).await?;
        move_reminders(manager).await?;
        db.execute_unprepared(RESOLVE_DUPLICATES).await?;
        db.execute_unprepared(ONE_PATIENT_PER_NUMBER).await?;
        manager
            .create_table(
                Table::create()
                    .table(ParkedReceipts::Table)
                    .col(string(ParkedReceipts::Gateway))
                    .col(string(ParkedReceipts::ProviderMessageId))
                    .col(string_len(ParkedReceipts::Status, 24))
                    .col(string_null(ParkedReceipts::ErrorCode))
                    .col(timestamp_with_time_zone(ParkedReceipts::ReceivedAt))
                    .primary_key(
                        Index::create()
                            .col(ParkedReceipts::Gateway)
                            .col(ParkedReceipts::ProviderMessageId)
                            .col(ParkedReceipts::Status),
                    )
                    .to_owned(),
            )
            .await?;
        for index in [
            Index::create()
                .name("idx_timers_patient_id")
                .table(Timers::Table)
                .col(Timers::PatientId)
                .to_owned(),
            Index::create()
                .name("idx_timers_user_id")
                .table(Timers::Table)
                .col(Timers::UserId)
                .to_owned(),
            Index::create()
                .name("idx_timers_fired_fired_at")
                .table(Timers::Table)
                .col(Timers::Fired)
                .col(Timers::FiredAt)
                .to_owned(),
            Index::create()
                .name("idx_inbound_receipts_received_at")
                .table(InboundReceipts::Table)
                .col(InboundReceipts::ReceivedAt)
                .to_owned(),
            Index::create()
                .name("idx_deliveries_status_created_at")
                .table(Deliveries::Table)
                .col(Deliveries::Status)
                .col(Deliveries::CreatedAt)
                .to_owned(),
            Index::create()
                .name("idx_parked_receipts_received_at")
                .table(ParkedReceipts::Table)
                .col(ParkedReceipts::ReceivedAt)
                .to_owned(),
        ] {
            manager.create_index(index).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ParkedReceipts::Table).to_owned())
            .await?;
        let db = manager.get_connection();
        for index in [
            "ux_patients_sms_number",
            "idx_timers_patient_id",
            "idx_timers_user_id",
            "idx_timers_fired_fired_at",
            "idx_inbound_receipts_received_at",
            "idx_deliveries_status_created_at",
        ] {
            db.execute_unprepared(&format!("DROP INDEX {index}"))
                .await?;
        }
        for column in [
            Timers::PatientId,
            Timers::UserId,
            Timers::Seq,
            Timers::Attempts,
            Timers::Dead,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Timers::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

/// Splits each unread reminder's subject `{patient}/{user}/{seq}` where the patient
/// and the user exist and belong to one practice; a subject no split fits keeps null
/// columns (its handler fires it without effect).
async fn move_reminders(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT id, subject FROM timers WHERE kind = 'unread_reminder'",
        ))
        .await?;
    for row in rows {
        let id: String = row.try_get("", "id")?;
        let subject: String = row.try_get("", "subject")?;
        let Some((head, seq)) = subject.rsplit_once('/') else {
            continue;
        };
        let Ok(seq) = seq.parse::<i64>() else {
            continue;
        };
        for (i, _) in head.match_indices('/') {
            let (patient, user) = (&head[..i], &head[i + 1..]);
            let found = db
                .query_one_raw(Statement::from_sql_and_values(
                    backend,
                    match backend {
                        sea_orm_migration::sea_orm::DatabaseBackend::Postgres => {
                            "SELECT 1 AS one FROM patients p JOIN users u \
                             ON u.practice_id = p.practice_id WHERE p.id = $1 AND u.id = $2"
                        }
                        _ => {
                            "SELECT 1 AS one FROM patients p JOIN users u \
                             ON u.practice_id = p.practice_id WHERE p.id = ? AND u.id = ?"
                        }
                    },
                    [patient.into(), user.into()],
                ))
                .await?;
            if found.is_some() {
                db.execute_raw(Statement::from_sql_and_values(
                    backend,
                    match backend {
                        sea_orm_migration::sea_orm::DatabaseBackend::Postgres => {
                            "UPDATE timers SET patient_id = $1, user_id = $2, seq = $3 \
                             WHERE id = $4"
                        }
                        _ => "UPDATE timers SET patient_id = ?, user_id = ?, seq = ? WHERE id = ?",
                    },
                    [patient.into(), user.into(), seq.into(), id.clone().into()],
                ))
                .await?;
                break;
            }
        }
    }
    Ok(())
}

#[derive(DeriveIden)]
enum Timers {
    Table,
    PatientId,
    UserId,
    Seq,
    Attempts,
    Dead,
    Fired,
    FiredAt,
}

#[derive(DeriveIden)]
enum Deliveries {
    Table,
    Status,
    CreatedAt,
}

#[derive(DeriveIden)]
enum InboundReceipts {
    Table,
    ReceivedAt,
}

#[derive(DeriveIden)]
enum ParkedReceipts {
    Table,
    Gateway,
    ProviderMessageId,
    Status,
    ErrorCode,
    ReceivedAt,
}
