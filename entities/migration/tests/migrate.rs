//! Migrates fresh databases and proves the entities match the schema, on SQLite always
//! and on PostgreSQL when `DATABASE_URL` names a PostgreSQL server.
//!
//! With `DATABASE_URL=postgres://...`, that URL is the admin connection: the test
//! creates a database `caremsg_mig_<random>` next to it and drops it afterwards.

use anyhow::{Context, Result, anyhow, ensure};
use caremsg_entities::{
    all_tables, audit_log, care_team_member, conversation, delivery, inbound_receipt, message,
    notification, notification_settings, patient, patient_program, practice, practice_sms_number,
    prelude::*, program, read_marker, sms_auth_attempt, sms_auth_session, sms_consent,
    sms_status_history, timer, unmatched_inbound, user, user_program_restriction,
};
use caremsg_migration::{Migrator, MigratorTrait, SchemaManager};
use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use sea_orm::{
    ActiveModelBehavior, ColumnTrait, ConnectionTrait, Database, DatabaseConnection, EntityTrait,
    IntoActiveModel, QueryFilter, QueryOrder,
};
use std::fmt::Debug;

#[tokio::test]
async fn migrations_build_the_schema_the_entities_expect() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("caremsg.db");
    let db = Database::connect(format!("sqlite://{}?mode=rwc", path.display())).await?;
    let outcome = exercise(&db).await.context("on SQLite");
    db.close().await?;
    outcome?;

    match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => on_fresh_postgres_database(&url).await,
        _ => Ok(()),
    }
}

/// Runs [`exercise`] on a new, randomly named database of the server at `admin_url`,
/// and drops that database whatever the outcome.
async fn on_fresh_postgres_database(admin_url: &str) -> Result<()> {
    let admin = Database::connect(admin_url)
        .await
        .context("connecting to DATABASE_URL")?;
    let name = format!("caremsg_mig_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await?;

    let outcome = async {
        let db = Database::connect(with_database(admin_url, &name)).await?;
        let outcome = exercise(&db).await;
        db.close().await?;
        outcome
    }
    .await
    .context("on PostgreSQL");

    let dropped = admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
    admin.close().await?;
    outcome?;
    dropped?;
    Ok(())
}

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |at| at + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

#[test]
fn with_database_replaces_only_the_database_name() {
    let cases = [
        (
            "postgres://postgres@127.0.0.1:5432/postgres",
            "postgres://postgres@127.0.0.1:5432/x",
        ),
        (
            "postgres://u@h/postgres?sslmode=disable",
            "postgres://u@h/x?sslmode=disable",
        ),
        ("postgres://u@h", "postgres://u@h/x"),
        ("postgresql://u:p@h:1/", "postgresql://u:p@h:1/x"),
    ];
    for (url, expected) in cases {
        assert_eq!(with_database(url, "x"), expected, "for {url}");
    }
}

/// Everything the test checks on one back end, starting from an empty database.
async fn exercise(db: &DatabaseConnection) -> Result<()> {
    Migrator::up(db, None).await.context("first migration")?;
    ensure!(
        Migrator::get_pending_migrations(db).await?.is_empty(),
        "migrations still pending after up"
    );
    Migrator::up(db, None)
        .await
        .context("second, no-op migration")?;
    ensure!(
        Migrator::get_applied_migrations(db).await?.len() == Migrator::migrations().len(),
        "a migration was recorded twice or not at all"
    );
    for table in all_tables() {
        ensure!(table_exists(db, table).await?, "table {table} is missing");
    }

    round_trip_every_entity(db).await?;
    constraints_hold(db).await?;
    queries_on_enum_and_time_columns(db).await?;

    Migrator::down(db, None).await.context("migrating down")?;
    for table in all_tables() {
        ensure!(
            !table_exists(db, table).await?,
            "table {table} survived down"
        );
    }
    Migrator::up(db, None)
        .await
        .context("migrating up after down")?;
    ensure!(
        Practice::find().all(db).await?.is_empty(),
        "a table kept rows across down and up"
    );
    Ok(())
}

async fn table_exists(db: &DatabaseConnection, table: &str) -> Result<bool> {
    Ok(SchemaManager::new(db).has_table(table).await?)
}

/// A fixed instant with microseconds, the finest precision both back ends keep.
fn at(minute: i64) -> Result<DateTime<Utc>> {
    let base = Utc
        .with_ymd_and_hms(2026, 1, 2, 3, 0, 5)
        .single()
        .ok_or_else(|| anyhow!("bad test instant"))?;
    Ok(base + Duration::minutes(minute) + Duration::microseconds(123_456))
}

/// Inserts `model` as the only row of its table and reads the table back.
async fn round_trip<E>(db: &DatabaseConnection, model: E::Model) -> Result<()>
where
    E: EntityTrait,
    E::Model: IntoActiveModel<E::ActiveModel> + PartialEq + Debug + Clone,
    E::ActiveModel: ActiveModelBehavior + Send,
{
    let table = E::default().table_name().to_owned();
    E::insert(model.clone().into_active_model())
        .exec_without_returning(db)
        .await
        .with_context(|| format!("inserting into {table}"))?;
    let rows = E::find()
        .all(db)
        .await
        .with_context(|| format!("reading {table}"))?;
    ensure!(
        rows == [model.clone()],
        "{table} read back {rows:?}, wrote {model:?}"
    );
    Ok(())
}

/// One row of every table, parents first, each read back equal to what was written.
async fn round_trip_every_entity(db: &DatabaseConnection) -> Result<()> {
    round_trip::<Practice>(
        db,
        practice::Model {
            id: "practice-1".into(),
            name: "Riverside Family Clinic".into(),
            sms_enabled: true,
            portal_enabled: false,
            country: "US".into(),
            timezone: "America/New_York".into(),
            sign_outbound_sms: false,
            active: true,
            created_at: at(0)?,
            updated_at: at(1)?,
        },
    )
    .await?;
    round_trip::<PracticeSmsNumber>(
        db,
        practice_sms_number::Model {
            number: "+15550100000".into(),
            practice_id: "practice-1".into(),
            gateway: "twilio-main".into(),
        },
    )
    .await?;
    round_trip::<Program>(
        db,
        program::Model {
            id: "program-ccm".into(),
            practice_id: "practice-1".into(),
            name: "CCM".into(),
            active: true,
            created_at: at(0)?,
            updated_at: at(0)?,
        },
    )
    .await?;
    round_trip::<User>(
        db,
        user::Model {
            id: "user-1".into(),
            practice_id: "practice-1".into(),
            name: "Nurse Joy".into(),
            email: Some("joy@example.invalid".into()),
            active: true,
            created_at: at(0)?,
            updated_at: at(2)?,
        },
    )
    .await?;
    round_trip::<UserProgramRestriction>(
        db,
        user_program_restriction::Model {
            user_id: "user-1".into(),
            program_id: "program-ccm".into(),
        },
    )
    .await?;
    round_trip::<NotificationSettings>(
        db,
        notification_settings::Model {
            user_id: "user-1".into(),
            new_patient_message: true,
            unread_reminder: true,
            two_way_texting: false,
            new_patient_message_in_app: true,
            new_patient_message_email: false,
            unread_reminder_in_app: true,
            unread_reminder_email: true,
            two_way_texting_in_app: true,
            two_way_texting_email: false,
            updated_at: at(3)?,
        },
    )
    .await?;
    round_trip::<Patient>(
        db,
        patient::Model {
            id: "patient-1".into(),
            practice_id: "practice-1".into(),
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
            search_name: "ada lovelace".into(),
            date_of_birth: NaiveDate::from_ymd_opt(1815, 12, 10)
                .ok_or_else(|| anyhow!("bad test date"))?,
            mobile_phone: Some("+15550100001".into()),
            portal_enrolled: true,
            sms_status: SmsStatus::OptedOut,
            sms_status_reason: Some(SmsStatusReason::PatientStop.as_str().into()),
            last_activity_at: Some(at(10)?),
            active: true,
            created_at: at(0)?,
            updated_at: at(10)?,
        },
    )
    .await?;
    round_trip::<PatientProgram>(
        db,
        patient_program::Model {
            patient_id: "patient-1".into(),
            program_id: "program-ccm".into(),
        },
    )
    .await?;
    round_trip::<CareTeamMember>(
        db,
        care_team_member::Model {
            patient_id: "patient-1".into(),
            user_id: "user-1".into(),
            role: CareTeamRole::NotificationUser,
            created_at: at(4)?,
        },
    )
    .await?;
    round_trip::<Conversation>(
        db,
        conversation::Model {
            patient_id: "patient-1".into(),
            practice_id: "practice-1".into(),
            last_seq: 1,
            last_message_at: Some(at(10)?),
            created_at: at(5)?,
        },
    )
    .await?;
    round_trip::<Message>(
        db,
        message::Model {
            id: "0195f0e0-0000-7000-8000-000000000001".into(),
            patient_id: "patient-1".into(),
            seq: 1,
            direction: Direction::ToPatient,
            channel: Channel::Sms,
            author_user_id: Some("user-1".into()),
            body: "Your appointment is at 10:00. — Joy ✓".into(),
            client_txn_key: Some("user:user-1:txn-1".into()),
            gateway: None,
            provider_message_id: None,
            possible_opt_out: false,
            read_by_patient_at: None,
            created_at: at(10)?,
        },
    )
    .await?;
    round_trip::<Notification>(
        db,
        notification::Model {
            id: "0195f0e0-0000-7000-8000-000000000002".into(),
            user_id: "user-1".into(),
            patient_id: "patient-1".into(),
            kind: NotificationKind::SmsStatus,
            subject: "sms_status:0195f0e0-0000-7000-8000-000000000009".into(),
            message_seq: Some(1),
            sms_status: Some(SmsStatus::OptedOut),
            created_at: at(11)?,
            read_at: None,
        },
    )
    .await?;
    round_trip::<Delivery>(
        db,
        delivery::Model {
            id: "0195f0e0-0000-7000-8000-000000000003".into(),
            message_id: Some("0195f0e0-0000-7000-8000-000000000001".into()),
            notification_id: None,
            patient_id: Some("patient-1".into()),
            practice_id: "practice-1".into(),
            channel: DeliveryChannel::Sms,
            purpose: DeliveryPurpose::Message,
            gateway: Some("twilio-main".into()),
            recipient: Some("+15550100001".into()),
            from_number: Some("+15550100000".into()),
            subject: None,
            body: None,
            status: DeliveryStatus::Queued,
            attempts: 2,
            next_attempt_at: at(12)?,
            claimed_at: Some(at(11)?),
            provider_message_id: Some("SM123".into()),
            error_code: Some("30003".into()),
            error_reason: Some("Unreachable handset".into()),
            created_at: at(10)?,
            updated_at: at(11)?,
        },
    )
    .await?;
    round_trip::<ReadMarker>(
        db,
        read_marker::Model {
            patient_id: "patient-1".into(),
            reader: read_marker::Model::user_reader("user-1"),
            last_read_seq: 1,
            read_at: at(13)?,
        },
    )
    .await?;
    round_trip::<SmsAuthSession>(
        db,
        sms_auth_session::Model {
            id: "0195f0e0-0000-7000-8000-000000000009".into(),
            patient_id: "patient-1".into(),
            practice_id: "practice-1".into(),
            phone: "+15550100001".into(),
            status: SmsAuthStatus::Superseded,
            reason: None,
            attempts: 1,
            started_by_user_id: Some("user-1".into()),
            started_at: at(1)?,
            last_sent_at: at(2)?,
            expires_at: at(2)? + Duration::days(14),
            ended_at: Some(at(9)?),
        },
    )
    .await?;
    round_trip::<SmsAuthAttempt>(
        db,
        sms_auth_attempt::Model {
            id: "0195f0e0-0000-7000-8000-000000000004".into(),
            session_id: "0195f0e0-0000-7000-8000-000000000009".into(),
            at: at(3)?,
            outcome: "wrong".into(),
        },
    )
    .await?;
    round_trip::<SmsStatusHistory>(
        db,
        sms_status_history::Model {
            id: "0195f0e0-0000-7000-8000-000000000005".into(),
            patient_id: "patient-1".into(),
            status: SmsStatus::Pending,
            reason: None,
            session_id: Some("0195f0e0-0000-7000-8000-000000000009".into()),
            changed_by_user_id: Some("user-1".into()),
            at: at(1)?,
        },
    )
    .await?;
    round_trip::<SmsConsent>(
        db,
        sms_consent::Model {
            practice_id: "practice-1".into(),
            phone: "+15550100001".into(),
            opted_out: true,
            reason: Some(SmsStatusReason::PatientStop.as_str().into()),
            changed_at: at(9)?,
        },
    )
    .await?;
    round_trip::<Timer>(
        db,
        timer::Model {
            id: "0195f0e0-0000-7000-8000-000000000006".into(),
            kind: TimerKind::UnreadReminder,
            subject: "patient-1:user-1".into(),
            due_at: at(10)? + Duration::hours(24),
            fired: false,
            fired_at: None,
            created_at: at(10)?,
            patient_id: Some("patient-1".into()),
            user_id: Some("user-1".into()),
            seq: Some(7),
            attempts: 2,
            dead: false,
        },
    )
    .await?;
    round_trip::<AuditLog>(
        db,
        audit_log::Model {
            id: "0195f0e0-0000-7000-8000-000000000007".into(),
            at: at(13)?,
            client: "staff-app".into(),
            actor_user_id: Some("user-1".into()),
            // No foreign key: an entry may name a patient the tables do not hold.
            patient_id: Some("patient-unknown".into()),
            action: "conversation.read".into(),
            detail: Some(r#"{"seq":1}"#.into()),
        },
    )
    .await?;
    round_trip::<InboundReceipt>(
        db,
        inbound_receipt::Model {
            gateway: "twilio-main".into(),
            provider_message_id: "SM999".into(),
            received_at: at(14)?,
            outcome: "unmatched".into(),
        },
    )
    .await?;
    round_trip::<UnmatchedInbound>(
        db,
        unmatched_inbound::Model {
            id: "0195f0e0-0000-7000-8000-000000000008".into(),
            gateway: "twilio-main".into(),
            provider_message_id: Some("SM999".into()),
            from_phone: "+15550100002".into(),
            to_phone: "+15550100000".into(),
            practice_id: Some("practice-1".into()),
            body: "who is this?".into(),
            answered: None,
            received_at: at(14)?,
        },
    )
    .await?;
    Ok(())
}

/// A message row like the stored one, with the given changes applied.
fn message_like(change: impl FnOnce(&mut message::Model)) -> Result<message::ActiveModel> {
    let mut model = message::Model {
        id: "0195f0e0-0000-7000-8000-0000000000ff".into(),
        patient_id: "patient-1".into(),
        seq: 2,
        direction: Direction::FromPatient,
        channel: Channel::Sms,
        author_user_id: None,
        body: "thanks".into(),
        client_txn_key: None,
        gateway: Some("twilio-main".into()),
        provider_message_id: Some("SM500".into()),
        possible_opt_out: false,
        read_by_patient_at: None,
        created_at: at(20)?,
    };
    change(&mut model);
    Ok(model.into_active_model())
}

/// Foreign keys and unique indexes are enforced on both back ends.
async fn constraints_hold(db: &DatabaseConnection) -> Result<()> {
    let refused = [
        (
            "a message of a conversation that does not exist",
            message_like(|m| m.patient_id = "patient-unknown".into())?,
        ),
        ("a second message with seq 1", message_like(|m| m.seq = 1)?),
        (
            "a reused client transaction key",
            message_like(|m| m.client_txn_key = Some("user:user-1:txn-1".into()))?,
        ),
    ];
    for (what, row) in refused {
        ensure!(
            Message::insert(row)
                .exec_without_returning(db)
                .await
                .is_err(),
            "the database accepted {what}"
        );
    }
    // Keys left empty do not collide with each other.
    Message::insert(message_like(|_| ())?)
        .exec_without_returning(db)
        .await
        .context("a valid second message")?;
    let duplicate_provider_id = message_like(|m| {
        m.id = "0195f0e0-0000-7000-8000-0000000000fe".into();
        m.seq = 3;
    })?;
    ensure!(
        Message::insert(duplicate_provider_id)
            .exec_without_returning(db)
            .await
            .is_err(),
        "the database accepted a provider message id twice"
    );
    let duplicate_notification = notification::Model {
        id: "0195f0e0-0000-7000-8000-0000000000fd".into(),
        user_id: "user-1".into(),
        patient_id: "patient-1".into(),
        kind: NotificationKind::SmsStatus,
        subject: "sms_status:0195f0e0-0000-7000-8000-000000000009".into(),
        message_seq: None,
        sms_status: None,
        created_at: at(21)?,
        read_at: None,
    };
    ensure!(
        Notification::insert(duplicate_notification.into_active_model())
            .exec_without_returning(db)
            .await
            .is_err(),
        "the database accepted a notification twice for one (user, kind, subject)"
    );
    Ok(())
}

/// Filters and orders on enum and timestamp columns work the same on both back ends.
async fn queries_on_enum_and_time_columns(db: &DatabaseConnection) -> Result<()> {
    let due = Delivery::find()
        .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
        .filter(delivery::Column::NextAttemptAt.lte(at(12)?))
        .order_by_asc(delivery::Column::NextAttemptAt)
        .all(db)
        .await?;
    ensure!(due.len() == 1, "expected one due delivery, got {due:?}");
    let not_yet = Delivery::find()
        .filter(delivery::Column::NextAttemptAt.lt(at(12)?))
        .all(db)
        .await?;
    ensure!(
        not_yet.is_empty(),
        "a timestamp compared wrongly: {not_yet:?}"
    );

    let opted_out = Patient::find()
        .filter(patient::Column::SmsStatus.eq(SmsStatus::OptedOut))
        .filter(patient::Column::SearchName.starts_with("ada"))
        .all(db)
        .await?;
    ensure!(
        opted_out.len() == 1,
        "expected one patient, got {opted_out:?}"
    );

    let messages = Message::find()
        .filter(message::Column::PatientId.eq("patient-1"))
        .order_by_desc(message::Column::Seq)
        .all(db)
        .await?;
    let seqs: Vec<i64> = messages.iter().map(|m| m.seq).collect();
    ensure!(seqs == [2, 1], "messages in the wrong order: {seqs:?}");
    Ok(())
}
