//! `caremsgd bench notifications`: New Patient Message notifications created by
//! portal messages sent through the patients' conversation actors (the path both the
//! portal API and inbound texts take; HTTP is the conversations benchmark's subject)
//! to patients with care teams, then unread reminders all overdue at once after a
//! restart, caught up by the timer service.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use caremsg_entities::{
    CareTeamRole, NotificationKind, SmsStatus, TimerKind, care_team_member, conversation,
    notification, notification_settings, patient, practice, timer, user,
};
use chrono::{NaiveDate, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter};

use crate::actors::conversation::{Author, SendMessage};
use crate::clock::ManualClock;
use crate::notifications::settings::{Change, Prefs, apply};
use crate::phi::Phi;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Patients.
    pub patients: usize,
    /// Users in each patient's care team (all notified, with the reminder on).
    pub team: usize,
    /// Staff users of the practice the care teams are drawn from.
    pub users: usize,
    /// Portal messages, spread evenly over the patients.
    pub messages: usize,
    /// Concurrent senders.
    pub clients: usize,
}

/// Where the benchmark's database lives.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A fresh SQLite file in a temporary directory.
    Sqlite,
    /// A fresh database created on the PostgreSQL server at this URL (and dropped).
    Postgres(String),
}

/// Figures of the notifications benchmark.
#[derive(Debug, Clone)]
pub struct Report {
    plan: Plan,
    backend: &'static str,
    messages_per_second: f64,
    notifications: u64,
    notifications_per_second: f64,
    failures: usize,
    reminders_armed: u64,
    start_up: Duration,
    reminders: u64,
    reminders_took: Duration,
    writer: [String; 2],
    ceiling: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = |d: Duration| d.as_secs_f64();
        writeln!(
            f,
            "notifications benchmark: {}, {} patients with care teams of {} (of {} users), {} portal messages through the actors from {} senders",
            self.backend,
            self.plan.patients,
            self.plan.team,
            self.plan.users,
            self.plan.messages,
            self.plan.clients
        )?;
        writeln!(
            f,
            "  messages acknowledged            {:>10.0} messages/s ({} failed)",
            self.messages_per_second, self.failures
        )?;
        writeln!(f, "  writer                           {}", self.writer[0])?;
        writeln!(
            f,
            "  in-app notifications created     {:>10.0} /s ({} in all; target >= 20,000/s: {})",
            self.notifications_per_second,
            self.notifications,
            super::verdict(self.notifications_per_second >= 20_000.0)
        )?;
        writeln!(
            f,
            "  reminder timers armed            {:>10}",
            self.reminders_armed
        )?;
        writeln!(
            f,
            "  restart after the due time: start-up {:.2} s",
            secs(self.start_up)
        )?;
        writeln!(
            f,
            "  due reminders delivered in-app   {:>10} in {:.2} s from start (target 100,000 < 10 s: {})",
            self.reminders,
            secs(self.reminders_took),
            super::verdict(
                self.reminders >= 100_000 && self.reminders_took < Duration::from_secs(10)
            )
        )?;
        writeln!(f, "  writer                           {}", self.writer[1])?;
        write!(
            f,
            "  ceiling (1,000-row INSERTs)      {:>10.0} rows/s (the write benchmark's baseline, this run)",
            self.ceiling
        )
    }
}

/// Runs the benchmark in a temporary state directory (and, for PostgreSQL, a
/// temporary database).
pub async fn run(plan: Plan, backend: Backend) -> anyhow::Result<Report> {
    super::in_scratch_dir(|dir| async move {
        match &backend {
            Backend::Sqlite => measure(plan, &dir, None).await,
            Backend::Postgres(server) => {
                super::with_postgres_database(server, |url| measure(plan, &dir, Some(url))).await
            }
        }
    })
    .await
}

async fn measure(
    plan: Plan,
    dir: &std::path::Path,
    database_url: Option<String>,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        plan.team <= plan.users && plan.patients > 0 && plan.clients > 0,
        "a care team cannot be larger than the practice's staff"
    );
    let ceiling = super::write_ceiling(dir, 50_000).await?;
    let mut settings = super::scratch_settings(dir)?;
    let backend = if database_url.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    settings.database.url = database_url;
    let clock = ManualClock::new(Utc::now());
    let options = crate::Options {
        clock: Arc::new(clock.clone()),
        ..crate::Options::default()
    };

    // 1. New Patient Message: every message notifies its patient's whole care team.
    let running = crate::start(settings.clone(), options.clone())
        .await
        .context("starting the daemon")?;
    let phase = async {
        seed(&running.state().db, plan).await?;
        let state = running.state().clone();
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..plan.clients {
            let (state, next, clock) = (state.clone(), next.clone(), clock.clone());
            tasks.push(tokio::spawn(async move {
                let mut failures = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= plan.messages {
                        break;
                    }
                    // Messages arrive over (simulated) time, a millisecond apart.
                    clock.advance(chrono::Duration::milliseconds(1));
                    let message = SendMessage {
                        author: Author::Patient,
                        client: "bench".to_owned(),
                        body: Phi::new("Could someone call me about my refill?".to_owned()),
                        client_txn_id: Some(format!("n{i}")),
                        rows: None,
                        serves: None,
                    };
                    let sent = state
                        .conversations
                        .send(&format!("np{}", i % plan.patients), message)
                        .await;
                    if !matches!(sent, Ok(Ok(_))) {
                        failures += 1;
                    }
                }
                failures
            }));
        }
        let mut failures = 0;
        for task in tasks {
            failures += task.await?;
        }
        let took = started.elapsed();
        let db = &running.state().db;
        let notifications = count(db, NotificationKind::NewPatientMessage).await?;
        let armed = timer::Entity::find()
            .filter(timer::Column::Kind.eq(TimerKind::UnreadReminder))
            .count(db)
            .await?;
        let writer = super::writer_summary(&running.state().metrics.render());
        Ok::<_, anyhow::Error>((took, failures, notifications, armed, writer))
    }
    .await;
    running.shutdown().await?;
    let (took, failures, notifications, reminders_armed, writer_sends) = phase?;

    // 2. Down across the due time; the start-up tick catches up.
    clock.advance(chrono::Duration::hours(25));
    let started = Instant::now();
    let running = crate::start(settings, options)
        .await
        .context("restarting the daemon")?;
    let start_up = started.elapsed();
    let phase = async {
        // Waits for the catch-up tick (or is it): every due reminder has fired.
        running.tick_timers().await?;
        let reminders_took = started.elapsed();
        let writer = super::writer_summary(&running.state().metrics.render());
        let reminders = count(&running.state().db, NotificationKind::UnreadReminder).await?;
        Ok::<_, anyhow::Error>((reminders_took, reminders, writer))
    }
    .await;
    running.shutdown().await?;
    let (reminders_took, reminders, writer_reminders) = phase?;

    Ok(Report {
        plan,
        backend,
        messages_per_second: (plan.messages - failures) as f64 / took.as_secs_f64(),
        notifications,
        notifications_per_second: notifications as f64 / took.as_secs_f64(),
        failures,
        reminders_armed,
        start_up,
        reminders,
        reminders_took,
        writer: [writer_sends, writer_reminders],
        ceiling,
    })
}

async fn count(db: &DatabaseConnection, kind: NotificationKind) -> anyhow::Result<u64> {
    Ok(notification::Entity::find()
        .filter(notification::Column::Kind.eq(kind))
        .count(db)
        .await?)
}

/// One practice; `users` users `nu0…` with New Patient Message and the reminder on;
/// `patients` portal-enrolled patients `np0…`, patient `i`'s care team being users
/// `i·team … i·team + team - 1` (modulo `users`). Inserted directly: the benchmark
/// measures notifications, not set-up.
async fn seed(db: &DatabaseConnection, plan: Plan) -> anyhow::Result<()> {
    let now = Utc::now();
    practice::Entity::insert(practice::ActiveModel {
        id: Set("bench".into()),
        name: Set("Bench Clinic".into()),
        sms_enabled: Set(false),
        portal_enabled: Set(true),
        country: Set("US".into()),
        timezone: Set("America/New_York".into()),
        sign_outbound_sms: Set(false),
        active: Set(true),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec_without_returning(db)
    .await?;
    let prefs = apply(
        Prefs::default(),
        &Change {
            unread_reminder: Some(true),
            ..Change::default()
        },
    )?;
    let user_ids: Vec<String> = (0..plan.users).map(|i| format!("nu{i}")).collect();
    for chunk in user_ids.chunks(1000) {
        user::Entity::insert_many(chunk.iter().map(|id| user::ActiveModel {
            id: Set(id.clone()),
            practice_id: Set("bench".into()),
            name: Set(format!("User {id}")),
            email: Set(None),
            active: Set(true),
            created_at: Set(now),
            updated_at: Set(now),
        }))
        .exec_without_returning(db)
        .await?;
        notification_settings::Entity::insert_many(chunk.iter().map(|id| prefs.to_row(id, now)))
            .exec_without_returning(db)
            .await?;
    }
    let dob = NaiveDate::from_ymd_opt(1950, 1, 1).unwrap_or_default();
    for start in (0..plan.patients).step_by(1000) {
        let range = start..(start + 1000).min(plan.patients);
        let ids: Vec<String> = range.clone().map(|i| format!("np{i}")).collect();
        patient::Entity::insert_many(ids.iter().map(|id| patient::ActiveModel {
            id: Set(id.clone()),
            practice_id: Set("bench".into()),
            first_name: Set("Bench".into()),
            last_name: Set(id.clone()),
            search_name: Set(format!("bench {id}")),
            date_of_birth: Set(dob),
            mobile_phone: Set(None),
            portal_enrolled: Set(true),
            sms_status: Set(SmsStatus::None),
            sms_status_reason: Set(None),
            last_activity_at: Set(None),
            active: Set(true),
            created_at: Set(now),
            updated_at: Set(now),
        }))
        .exec_without_returning(db)
        .await?;
        conversation::Entity::insert_many(ids.iter().map(|id| conversation::ActiveModel {
            patient_id: Set(id.clone()),
            practice_id: Set("bench".into()),
            last_seq: Set(0),
            last_message_at: Set(None),
            created_at: Set(now),
        }))
        .exec_without_returning(db)
        .await?;
        let members: Vec<care_team_member::ActiveModel> = range
            .flat_map(|i| {
                (0..plan.team).map(move |k| care_team_member::ActiveModel {
                    patient_id: Set(format!("np{i}")),
                    user_id: Set(format!("nu{}", (i * plan.team + k) % plan.users)),
                    role: Set(CareTeamRole::Member),
                    created_at: Set(now),
                })
            })
            .collect();
        for chunk in members.chunks(2000) {
            care_team_member::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(db)
                .await?;
        }
    }
    Ok(())
}
