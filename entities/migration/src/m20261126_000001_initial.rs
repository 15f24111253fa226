//! The initial schema: every table, foreign key and index of caremsg's model.
//!
//! Written with the sea-query schema builder only, so the same statements run on
//! SQLite and PostgreSQL. Foreign keys are declared inside `CREATE TABLE` (SQLite
//! cannot add them later), so tables are created parents first. Enums are
//! `varchar(24)` columns, never database-native enum types. Foreign keys keep the
//! default `NO ACTION`: records are deactivated, not deleted, so nothing cascades.
//!
//! Like every migration, this file is history: once released it never changes; a
//! later change to the model is a new migration.

use sea_orm_migration::{prelude::*, schema::*};

/// Length of the string columns that hold enum values.
const ENUM_LEN: u32 = 24;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// In one transaction on both back ends (SQLite's DDL is transactional too), so a
    /// failure leaves no half-made schema.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in tables() {
            manager.create_table(table).await?;
        }
        for index in indexes() {
            manager.create_index(index).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Children before parents; dropping a table drops its indexes.
        for table in tables().iter().rev() {
            if let Some(name) = table.get_table_name() {
                manager
                    .drop_table(Table::drop().table(name.clone()).to_owned())
                    .await?;
            }
        }
        Ok(())
    }
}

/// A foreign key `table.column` → `ref_table.ref_column`, named `fk_<table>_<column>`.
fn fk<T, C, R, RC>(table: T, column: C, ref_table: R, ref_column: RC) -> ForeignKeyCreateStatement
where
    T: IntoIden,
    C: IntoIden,
    R: IntoIden,
    RC: IntoIden,
{
    let table = table.into_iden();
    let column = column.into_iden();
    ForeignKey::create()
        .name(format!("fk_{table}_{column}"))
        .from(table, column)
        .to(ref_table, ref_column)
        .to_owned()
}

/// An index on `table (columns)`, named `idx_<table>_<columns>` (`ux_` when unique).
fn index<T, C, I>(table: T, columns: I, unique: bool) -> IndexCreateStatement
where
    T: IntoIden,
    C: IntoIden,
    I: IntoIterator<Item = C>,
{
    let table = table.into_iden();
    let mut stmt = Index::create();
    let mut name = format!("{}_{table}", if unique { "ux" } else { "idx" });
    for column in columns {
        let column = column.into_iden();
        name.push('_');
        name.push_str(&column.to_string());
        stmt.col(column);
    }
    if unique {
        stmt.unique();
    }
    stmt.name(name).table(table).to_owned()
}

/// A string column holding an enum value.
fn enum_string<T: IntoIden>(column: T) -> ColumnDef {
    string_len(column, ENUM_LEN)
}

/// A nullable string column holding an enum value.
fn enum_string_null<T: IntoIden>(column: T) -> ColumnDef {
    string_len_null(column, ENUM_LEN)
}

/// Every table, parents before children.
fn tables() -> Vec<TableCreateStatement> {
    vec![
        Table::create()
            .table(Practices::Table)
            .col(string(Practices::Id).primary_key())
            .col(string(Practices::Name))
            .col(boolean(Practices::SmsEnabled))
            .col(boolean(Practices::PortalEnabled))
            .col(string(Practices::Country))
            .col(string(Practices::Timezone))
            .col(boolean(Practices::SignOutboundSms))
            .col(boolean(Practices::Active))
            .col(timestamp_with_time_zone(Practices::CreatedAt))
            .col(timestamp_with_time_zone(Practices::UpdatedAt))
            .to_owned(),
        Table::create()
            .table(PracticeSmsNumbers::Table)
            .col(string(PracticeSmsNumbers::Number).primary_key())
            .col(string(PracticeSmsNumbers::PracticeId))
            .col(string(PracticeSmsNumbers::Gateway))
            .foreign_key(&mut fk(
                PracticeSmsNumbers::Table,
                PracticeSmsNumbers::PracticeId,
                Practices::Table,
                Practices::Id,
            ))
            .to_owned(),
        Table::create()
            .table(Programs::Table)
            .col(string(Programs::Id).primary_key())
            .col(string(Programs::PracticeId))
            .col(string(Programs::Name))
            .col(boolean(Programs::Active))
            .col(timestamp_with_time_zone(Programs::CreatedAt))
            .col(timestamp_with_time_zone(Programs::UpdatedAt))
            .foreign_key(&mut fk(
                Programs::Table,
                Programs::PracticeId,
                Practices::Table,
                Practices::Id,
            ))
            .to_owned(),
        Table::create()
            .table(Users::Table)
            .col(string(Users::Id).primary_key())
            .col(string(Users::PracticeId))
            .col(string(Users::Name))
            .col(string_null(Users::Email))
            .col(boolean(Users::Active))
            .col(timestamp_with_time_zone(Users::CreatedAt))
            .col(timestamp_with_time_zone(Users::UpdatedAt))
            .foreign_key(&mut fk(
                Users::Table,
                Users::PracticeId,
                Practices::Table,
                Practices::Id,
            ))
            .to_owned(),
        Table::create()
            .table(UserProgramRestrictions::Table)
            .col(string(UserProgramRestrictions::UserId))
            .col(string(UserProgramRestrictions::ProgramId))
            .primary_key(
                Index::create()
                    .col(UserProgramRestrictions::UserId)
                    .col(UserProgramRestrictions::ProgramId),
            )
            .foreign_key(&mut fk(
                UserProgramRestrictions::Table,
                UserProgramRestrictions::UserId,
                Users::Table,
                Users::Id,
            ))
            .foreign_key(&mut fk(
                UserProgramRestrictions::Table,
                UserProgramRestrictions::ProgramId,
                Programs::Table,
                Programs::Id,
            ))
            .to_owned(),
        Table::create()
            .table(NotificationSettings::Table)
            .col(string(NotificationSettings::UserId).primary_key())
            .col(boolean(NotificationSettings::NewPatientMessage))
            .col(boolean(NotificationSettings::UnreadReminder))
            .col(boolean(NotificationSettings::TwoWayTexting))
            .col(boolean(NotificationSettings::NewPatientMessageInApp))
            .col(boolean(NotificationSettings::NewPatientMessageEmail))
            .col(boolean(NotificationSettings::UnreadReminderInApp))
            .col(boolean(NotificationSettings::UnreadReminderEmail))
            .col(boolean(NotificationSettings::TwoWayTextingInApp))
            .col(boolean(NotificationSettings::TwoWayTextingEmail))
            .col(timestamp_with_time_zone(NotificationSettings::UpdatedAt))
            .foreign_key(&mut fk(
                NotificationSettings::Table,
                NotificationSettings::UserId,
                Users::Table,
                Users::Id,
            ))
            .to_owned(),
        Table::create()
            .table(Patients::Table)
            .col(string(Patients::Id).primary_key())
            .col(string(Patients::PracticeId))
            .col(string(Patients::FirstName))
            .col(string(Patients::LastName))
            .col(string(Patients::SearchName))
            .col(date(Patients::DateOfBirth))
            .col(string_null(Patients::MobilePhone))
            .col(boolean(Patients::PortalEnrolled))
            .col(enum_string(Patients::SmsStatus))
            .col(string_null(Patients::SmsStatusReason))
            .col(timestamp_with_time_zone_null(Patients::LastActivityAt))
            .col(boolean(Patients::Active))
            .col(timestamp_with_time_zone(Patients::CreatedAt))
            .col(timestamp_with_time_zone(Patients::UpdatedAt))
            .foreign_key(&mut fk(
                Patients::Table,
                Patients::PracticeId,
                Practices::Table,
                Practices::Id,
            ))
            .to_owned(),
        Table::create()
            .table(PatientPrograms::Table)
            .col(string(PatientPrograms::PatientId))
            .col(string(PatientPrograms::ProgramId))
            .primary_key(
                Index::create()
                    .col(PatientPrograms::PatientId)
                    .col(PatientPrograms::ProgramId),
            )
            .foreign_key(&mut fk(
                PatientPrograms::Table,
                PatientPrograms::PatientId,
                Patients::Table,
                Patients::Id,
            ))
            .foreign_key(&mut fk(
                PatientPrograms::Table,
                PatientPrograms::ProgramId,
                Programs::Table,
                Programs::Id,
            ))
            .to_owned(),
        Table::create()
            .table(CareTeamMembers::Table)
            .col(string(CareTeamMembers::PatientId))
            .col(string(CareTeamMembers::UserId))
            .col(enum_string(CareTeamMembers::Role))
            .col(timestamp_with_time_zone(CareTeamMembers::CreatedAt))
            .primary_key(
                Index::create()
                    .col(CareTeamMembers::PatientId)
                    .col(CareTeamMembers::UserId),
            )
            .foreign_key(&mut fk(
                CareTeamMembers::Table,
                CareTeamMembers::PatientId,
                Patients::Table,
                Patients::Id,
            ))
            .foreign_key(&mut fk(
                CareTeamMembers::Table,
                CareTeamMembers::UserId,
                Users::Table,
                Users::Id,
            ))
            .to_owned(),
        Table::create()
            .table(Conversations::Table)
            .col(string(Conversations::PatientId).primary_key())
            .col(string(Conversations::PracticeId))
            .col(big_integer(Conversations::LastSeq))
            .col(timestamp_with_time_zone_null(Conversations::LastMessageAt))
            .col(timestamp_with_time_zone(Conversations::CreatedAt))
            .foreign_key(&mut fk(
                Conversations::Table,
                Conversations::PatientId,
                Patients::Table,
                Patients::Id,
            ))
            .foreign_key(&mut fk(
                Conversations::Table,
                Conversations::PracticeId,
                Practices::Table,
                Practices::Id,
            ))
            .to_owned(),
        Table::create()
            .table(Messages::Table)
            .col(string(Messages::Id).primary_key())
            .col(string(Messages::PatientId))
            .col(big_integer(Messages::Seq))
            .col(enum_string(Messages::Direction))
            .col(enum_string(Messages::Channel))
            .col(string_null(Messages::AuthorUserId))
            .col(text(Messages::Body))
            .col(string_null(Messages::ClientTxnKey))
            .col(string_null(Messages::Gateway))
            .col(string_null(Messages::ProviderMessageId))
            .col(boolean(Messages::PossibleOptOut))
            .col(timestamp_with_time_zone_null(Messages::ReadByPatientAt))
            .col(timestamp_with_time_zone(Messages::CreatedAt))
            .foreign_key(&mut fk(
                Messages::Table,
                Messages::PatientId,
                Conversations::Table,
                Conversations::PatientId,
            ))
            .foreign_key(&mut fk(
                Messages::Table,
                Messages::AuthorUserId,
                Users::Table,
                Users::Id,
            ))
            .to_owned(),
        Table::create()
            .table(Notifications::Table)
            .col(string(Notifications::Id).primary_key())
            .col(string(Notifications::UserId))
            .col(string(Notifications::PatientId))
            .col(enum_string(Notifications::Kind))
            .col(string(Notifications::Subject))
            .col(big_integer_null(Notifications::MessageSeq))
            .col(enum_string_null(Notifications::SmsStatus))
            .col(timestamp_with_time_zone(Notifications::CreatedAt))
            .col(timestamp_with_time_zone_null(Notifications::ReadAt))
            .foreign_key(&mut fk(
                Notifications::Table,
                Notifications::UserId,
                Users::Table,
                Users::Id,
            ))
            .foreign_key(&mut fk(
                Notifications::Table,
                Notifications::PatientId,
                Patients::Table,
                Patients::Id,
            ))
            .to_owned(),
        Table::create()
            .table(Deliveries::Table)
            .col(string(Deliveries::Id).primary_key())
            .col(string_null(Deliveries::MessageId))
            .col(string_null(Deliveries::NotificationId))
            .col(string_null(Deliveries::PatientId))
            .col(string(Deliveries::PracticeId))
            .col(enum_string(Deliveries::Channel))
            .col(enum_string(Deliveries::Purpose))
            .col(string_null(Deliveries::Gateway))
            .col(string_null(Deliveries::Recipient))
            .col(string_null(Deliveries::FromNumber))
            .col(string_null(Deliveries::Subject))
            .col(text_null(Deliveries::Body))
            .col(enum_string(Deliveries::Status))
            .col(integer(Deliveries::Attempts))
            .col(timestamp_with_time_zone(Deliveries::NextAttemptAt))
            .col(timestamp_with_time_zone_null(Deliveries::ClaimedAt))
            .col(string_null(Deliveries::ProviderMessageId))
            .col(string_null(Deliveries::ErrorCode))
            .col(string_null(Deliveries::ErrorReason))
            .col(timestamp_with_time_zone(Deliveries::CreatedAt))
            .col(timestamp_with_time_zone(Deliveries::UpdatedAt))
            .foreign_key(&mut fk(
                Deliveries::Table,
                Deliveries::MessageId,
                Messages::Table,
                Messages::Id,
            ))
            .foreign_key(&mut fk(
                Deliveries::Table,
                Deliveries::NotificationId,
                Notifications::Table,
                Notifications::Id,
            ))
            .foreign_key(&mut fk(
                Deliveries::Table,
                Deliveries::PatientId,
                Patients::Table,
                Patients::Id,
            ))
            .foreign_key(&mut fk(
                Deliveries::Table,
                Deliveries::PracticeId,
                Practices::Table,
                Practices::Id,
            ))
            .to_owned(),
        Table::create()
            .table(ReadMarkers::Table)
            .col(string(ReadMarkers::PatientId))
            .col(string(ReadMarkers::Reader))
            .col(big_integer(ReadMarkers::LastReadSeq))
            .col(timestamp_with_time_zone(ReadMarkers::ReadAt))
            .primary_key(
                Index::create()
                    .col(ReadMarkers::PatientId)
                    .col(ReadMarkers::Reader),
            )
            .foreign_key(&mut fk(
                ReadMarkers::Table,
                ReadMarkers::PatientId,
                Conversations::Table,
                Conversations::PatientId,
            ))
            .to_owned(),
        Table::create()
            .table(SmsAuthSessions::Table)
            .col(string(SmsAuthSessions::Id).primary_key())
            .col(string(SmsAuthSessions::PatientId))
            .col(string(SmsAuthSessions::PracticeId))
            .col(string(SmsAuthSessions::Phone))
            .col(enum_string(SmsAuthSessions::Status))
            .col(string_null(SmsAuthSessions::Reason))
            .col(integer(SmsAuthSessions::Attempts))
            .col(string_null(SmsAuthSessions::StartedByUserId))
            .col(timestamp_with_time_zone(SmsAuthSessions::StartedAt))
            .col(timestamp_with_time_zone(SmsAuthSessions::LastSentAt))
            .col(timestamp_with_time_zone(SmsAuthSessions::ExpiresAt))
            .col(timestamp_with_time_zone_null(SmsAuthSessions::EndedAt))
            .foreign_key(&mut fk(
                SmsAuthSessions::Table,
                SmsAuthSessions::PatientId,
                Patients::Table,
                Patients::Id,
            ))
            .foreign_key(&mut fk(
                SmsAuthSessions::Table,
                SmsAuthSessions::PracticeId,
                Practices::Table,
                Practices::Id,
            ))
            .foreign_key(&mut fk(
                SmsAuthSessions::Table,
                SmsAuthSessions::StartedByUserId,
                Users::Table,
                Users::Id,
            ))
            .to_owned(),
        Table::create()
            .table(SmsAuthAttempts::Table)
            .col(string(SmsAuthAttempts::Id).primary_key())
            .col(string(SmsAuthAttempts::SessionId))
            .col(timestamp_with_time_zone(SmsAuthAttempts::At))
            .col(string(SmsAuthAttempts::Outcome))
            .foreign_key(&mut fk(
                SmsAuthAttempts::Table,
                SmsAuthAttempts::SessionId,
                SmsAuthSessions::Table,
                SmsAuthSessions::Id,
            ))
            .to_owned(),
        Table::create()
            .table(SmsStatusHistory::Table)
            .col(string(SmsStatusHistory::Id).primary_key())
            .col(string(SmsStatusHistory::PatientId))
            .col(enum_string(SmsStatusHistory::Status))
            .col(string_null(SmsStatusHistory::Reason))
            .col(string_null(SmsStatusHistory::SessionId))
            .col(string_null(SmsStatusHistory::ChangedByUserId))
            .col(timestamp_with_time_zone(SmsStatusHistory::At))
            .foreign_key(&mut fk(
                SmsStatusHistory::Table,
                SmsStatusHistory::PatientId,
                Patients::Table,
                Patients::Id,
            ))
            .foreign_key(&mut fk(
                SmsStatusHistory::Table,
                SmsStatusHistory::SessionId,
                SmsAuthSessions::Table,
                SmsAuthSessions::Id,
            ))
            .foreign_key(&mut fk(
                SmsStatusHistory::Table,
                SmsStatusHistory::ChangedByUserId,
                Users::Table,
                Users::Id,
            ))
            .to_owned(),
        Table::create()
            .table(SmsConsent::Table)
            .col(string(SmsConsent::PracticeId))
            .col(string(SmsConsent::Phone))
            .col(boolean(SmsConsent::OptedOut))
            .col(string_null(SmsConsent::Reason))
            .col(timestamp_with_time_zone(SmsConsent::ChangedAt))
            .primary_key(
                Index::create()
                    .col(SmsConsent::PracticeId)
                    .col(SmsConsent::Phone),
            )
            .foreign_key(&mut fk(
                SmsConsent::Table,
                SmsConsent::PracticeId,
                Practices::Table,
                Practices::Id,
            ))
            .to_owned(),
        Table::create()
            .table(Timers::Table)
            .col(string(Timers::Id).primary_key())
            .col(enum_string(Timers::Kind))
            .col(string(Timers::Subject))
            .col(timestamp_with_time_zone(Timers::DueAt))
            .col(boolean(Timers::Fired))
            .col(timestamp_with_time_zone_null(Timers::FiredAt))
            .col(timestamp_with_time_zone(Timers::CreatedAt))
            .to_owned(),
        // Append-only, and deliberately without foreign keys: entries outlive anything.
        Table::create()
            .table(AuditLog::Table)
            .col(string(AuditLog::Id).primary_key())
            .col(timestamp_with_time_zone(AuditLog::At))
            .col(string(AuditLog::Client))
            .col(string_null(AuditLog::ActorUserId))
            .col(string_null(AuditLog::PatientId))
            .col(string(AuditLog::Action))
            .col(text_null(AuditLog::Detail))
            .to_owned(),
        Table::create()
            .table(InboundReceipts::Table)
            .col(string(InboundReceipts::Gateway))
            .col(string(InboundReceipts::ProviderMessageId))
            .col(timestamp_with_time_zone(InboundReceipts::ReceivedAt))
            .col(string(InboundReceipts::Outcome))
            .primary_key(
                Index::create()
                    .col(InboundReceipts::Gateway)
                    .col(InboundReceipts::ProviderMessageId),
            )
            .to_owned(),
        Table::create()
            .table(UnmatchedInbound::Table)
            .col(string(UnmatchedInbound::Id).primary_key())
            .col(string(UnmatchedInbound::Gateway))
            .col(string_null(UnmatchedInbound::ProviderMessageId))
            .col(string(UnmatchedInbound::FromPhone))
            .col(string(UnmatchedInbound::ToPhone))
            .col(string_null(UnmatchedInbound::PracticeId))
            .col(text(UnmatchedInbound::Body))
            .col(string_null(UnmatchedInbound::Answered))
            .col(timestamp_with_time_zone(UnmatchedInbound::ReceivedAt))
            .to_owned(),
    ]
}

/// Every index that is not a primary key.
fn indexes() -> Vec<IndexCreateStatement> {
    use Patients as P;
    vec![
        index(
            PracticeSmsNumbers::Table,
            [PracticeSmsNumbers::PracticeId],
            false,
        ),
        index(Programs::Table, [Programs::PracticeId], false),
        index(Users::Table, [Users::PracticeId], false),
        index(P::Table, [P::PracticeId, P::MobilePhone], false),
        index(P::Table, [P::PracticeId, P::DateOfBirth], false),
        index(P::Table, [P::PracticeId, P::SearchName], false),
        index(P::Table, [P::PracticeId, P::LastActivityAt], false),
        index(
            CareTeamMembers::Table,
            [CareTeamMembers::UserId, CareTeamMembers::PatientId],
            false,
        ),
        index(
            Conversations::Table,
            [Conversations::PracticeId, Conversations::LastMessageAt],
            false,
        ),
        index(Messages::Table, [Messages::PatientId, Messages::Seq], true),
        index(
            Messages::Table,
            [Messages::PatientId, Messages::ClientTxnKey],
            true,
        ),
        index(
            Messages::Table,
            [Messages::Gateway, Messages::ProviderMessageId],
            true,
        ),
        index(
            Notifications::Table,
            [
                Notifications::UserId,
                Notifications::Kind,
                Notifications::Subject,
            ],
            true,
        ),
        index(
            Notifications::Table,
            [Notifications::UserId, Notifications::CreatedAt],
            false,
        ),
        index(
            Deliveries::Table,
            [Deliveries::Status, Deliveries::NextAttemptAt],
            false,
        ),
        index(Deliveries::Table, [Deliveries::MessageId], false),
        index(
            Deliveries::Table,
            [Deliveries::Gateway, Deliveries::ProviderMessageId],
            true,
        ),
        index(
            SmsAuthSessions::Table,
            [
                SmsAuthSessions::PracticeId,
                SmsAuthSessions::Phone,
                SmsAuthSessions::Status,
            ],
            false,
        ),
        index(
            SmsAuthSessions::Table,
            [SmsAuthSessions::PatientId, SmsAuthSessions::StartedAt],
            false,
        ),
        index(SmsAuthAttempts::Table, [SmsAuthAttempts::SessionId], false),
        index(
            SmsStatusHistory::Table,
            [SmsStatusHistory::PatientId, SmsStatusHistory::At],
            false,
        ),
        index(Timers::Table, [Timers::Kind, Timers::Subject], true),
        index(Timers::Table, [Timers::Fired, Timers::DueAt], false),
        index(AuditLog::Table, [AuditLog::PatientId, AuditLog::At], false),
        index(
            UnmatchedInbound::Table,
            [UnmatchedInbound::ReceivedAt],
            false,
        ),
    ]
}

#[derive(DeriveIden)]
enum Practices {
    Table,
    Id,
    Name,
    SmsEnabled,
    PortalEnabled,
    Country,
    Timezone,
    SignOutboundSms,
    Active,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum PracticeSmsNumbers {
    Table,
    Number,
    PracticeId,
    Gateway,
}

#[derive(DeriveIden)]
enum Programs {
    Table,
    Id,
    PracticeId,
    Name,
    Active,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    PracticeId,
    Name,
    Email,
    Active,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum UserProgramRestrictions {
    Table,
    UserId,
    ProgramId,
}

#[derive(DeriveIden)]
enum NotificationSettings {
    Table,
    UserId,
    NewPatientMessage,
    UnreadReminder,
    TwoWayTexting,
    NewPatientMessageInApp,
    NewPatientMessageEmail,
    UnreadReminderInApp,
    UnreadReminderEmail,
    TwoWayTextingInApp,
    TwoWayTextingEmail,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Patients {
    Table,
    Id,
    PracticeId,
    FirstName,
    LastName,
    SearchName,
    DateOfBirth,
    MobilePhone,
    PortalEnrolled,
    SmsStatus,
    SmsStatusReason,
    LastActivityAt,
    Active,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum PatientPrograms {
    Table,
    PatientId,
    ProgramId,
}

#[derive(DeriveIden)]
enum CareTeamMembers {
    Table,
    PatientId,
    UserId,
    Role,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Conversations {
    Table,
    PatientId,
    PracticeId,
    LastSeq,
    LastMessageAt,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Messages {
    Table,
    Id,
    PatientId,
    Seq,
    Direction,
    Channel,
    AuthorUserId,
    Body,
    ClientTxnKey,
    Gateway,
    ProviderMessageId,
    PossibleOptOut,
    ReadByPatientAt,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Deliveries {
    Table,
    Id,
    MessageId,
    NotificationId,
    PatientId,
    PracticeId,
    Channel,
    Purpose,
    Gateway,
    Recipient,
    FromNumber,
    Subject,
    Body,
    Status,
    Attempts,
    NextAttemptAt,
    ClaimedAt,
    ProviderMessageId,
    ErrorCode,
    ErrorReason,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum ReadMarkers {
    Table,
    PatientId,
    Reader,
    LastReadSeq,
    ReadAt,
}

#[derive(DeriveIden)]
enum SmsAuthSessions {
    Table,
    Id,
    PatientId,
    PracticeId,
    Phone,
    Status,
    Reason,
    Attempts,
    StartedByUserId,
    StartedAt,
    LastSentAt,
    ExpiresAt,
    EndedAt,
}

#[derive(DeriveIden)]
enum SmsAuthAttempts {
    Table,
    Id,
    SessionId,
    At,
    Outcome,
}

#[derive(DeriveIden)]
enum SmsStatusHistory {
    Table,
    Id,
    PatientId,
    Status,
    Reason,
    SessionId,
    ChangedByUserId,
    At,
}

#[derive(DeriveIden)]
enum SmsConsent {
    Table,
    PracticeId,
    Phone,
    OptedOut,
    Reason,
    ChangedAt,
}

#[derive(DeriveIden)]
enum Timers {
    Table,
    Id,
    Kind,
    Subject,
    DueAt,
    Fired,
    FiredAt,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Notifications {
    Table,
    Id,
    UserId,
    PatientId,
    Kind,
    Subject,
    MessageSeq,
    SmsStatus,
    CreatedAt,
    ReadAt,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    Id,
    At,
    Client,
    ActorUserId,
    PatientId,
    Action,
    Detail,
}

#[derive(DeriveIden)]
enum InboundReceipts {
    Table,
    Gateway,
    ProviderMessageId,
    ReceivedAt,
    Outcome,
}

#[derive(DeriveIden)]
enum UnmatchedInbound {
    Table,
    Id,
    Gateway,
    ProviderMessageId,
    FromPhone,
    ToPhone,
    PracticeId,
    Body,
    Answered,
    ReceivedAt,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_postgres_identifiers() {
        let names = indexes()
            .iter()
            .filter_map(|index| index.get_index_spec().get_name().map(str::to_owned))
            .chain(tables().iter().flat_map(|table| {
                table
                    .get_foreign_key_create_stmts()
                    .iter()
                    .filter_map(|fk| fk.get_foreign_key().get_name().map(str::to_owned))
                    .collect::<Vec<_>>()
            }))
            .collect::<Vec<_>>();
        assert!(names.len() > 40, "only {} names", names.len());
        for expected in ["fk_messages_patient_id", "ux_messages_patient_id_seq"] {
            assert!(names.iter().any(|name| name == expected), "no {expected}");
        }
        for name in &names {
            assert!(name.len() <= 63, "{name} is longer than 63 bytes");
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            names.len(),
            "duplicate constraint or index names"
        );
    }
}
