//! `caremsgd bench sms-auth`: a restart with many pending SMS authentications, and
//! date-of-birth replies through the inbound entry point.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use caremsg_entities::{
    SmsAuthStatus, SmsStatus, TimerKind, conversation, patient, practice, practice_sms_number,
    sms_auth_session, timer,
};
use chrono::{NaiveDate, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::EntityTrait;

use crate::gateways::inbound::{InboundSms, route};
use crate::phi::Phi;

/// Figures of the SMS authentication benchmark.
#[derive(Debug, Clone)]
pub struct Report {
    sessions: usize,
    ready_seconds: f64,
    rss_bytes: u64,
    replies: usize,
    replies_per_second: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = self.rss_bytes as f64 / (1024.0 * 1024.0);
        writeln!(
            f,
            "sms-auth benchmark: SQLite, {} pending sessions (deadlines are indexed timer rows)",
            self.sessions
        )?;
        writeln!(
            f,
            "  restart until ready (migrated, serving, first timer tick done) {:>8.1} ms  (target < 3 s: {})",
            self.ready_seconds * 1000.0,
            super::verdict(self.ready_seconds < 3.0)
        )?;
        writeln!(
            f,
            "  resident memory after                                          {mib:>8.1} MiB (target < 300: {})",
            super::verdict(mib < 300.0)
        )?;
        write!(
            f,
            "  date-of-birth replies through the inbound entry point          {:>8.0} replies/s ({} replies)",
            self.replies_per_second, self.replies
        )
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn phone(i: usize) -> String {
    format!("+1415{:07}", 2_000_000 + i)
}

/// Runs the benchmark in a temporary state directory.
pub async fn run(sessions: usize, replies: usize) -> anyhow::Result<Report> {
    super::in_scratch_dir(|dir| async move { measure(&dir, sessions, replies.min(sessions)).await })
        .await
}

async fn measure(dir: &std::path::Path, sessions: usize, replies: usize) -> anyhow::Result<Report> {
    let settings = super::scratch_settings(dir)?;
    {
        let db = crate::open_database(&settings).await?;
        seed(&db, sessions).await.context("seeding the sessions")?;
        db.close().await?;
    }
    let started = Instant::now();
    let running = crate::start(settings, crate::Options::default())
        .await
        .context("starting the daemon")?;
    running
        .tick_timers()
        .await
        .context("the first timer tick")?;
    let ready_seconds = started.elapsed().as_secs_f64();
    let rss = rss_bytes();
    let state = running.state().clone();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (state, next) = (state.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= replies {
                    return Ok::<_, anyhow::Error>(());
                }
                let sms = InboundSms {
                    gateway: "loopback".into(),
                    provider_message_id: format!("bench-{i}"),
                    from: Phi::new(phone(i)),
                    to: Phi::new("+12015550100".to_owned()),
                    body: Phi::new("1/2/1950".to_owned()),
                };
                route(&state, sms)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let replies_per_second = replies as f64 / started.elapsed().as_secs_f64();
    drop(state);
    running.shutdown().await?;
    Ok(Report {
        sessions,
        ready_seconds,
        rss_bytes: rss,
        replies,
        replies_per_second,
    })
}

async fn seed(db: &sea_orm::DatabaseConnection, count: usize) -> anyhow::Result<()> {
    let now = Utc::now();
    practice::Entity::insert(practice::ActiveModel {
        id: Set("bench".into()),
        name: Set("Bench Clinic".into()),
        sms_enabled: Set(true),
        portal_enabled: Set(false),
        country: Set("US".into()),
        timezone: Set("America/New_York".into()),
        sign_outbound_sms: Set(false),
        active: Set(true),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec_without_returning(db)
    .await?;
    practice_sms_number::Entity::insert(practice_sms_number::ActiveModel {
        number: Set("+12015550100".into()),
        practice_id: Set("bench".into()),
        gateway: Set("loopback".into()),
    })
    .exec_without_returning(db)
    .await?;
    let dob = NaiveDate::from_ymd_opt(1950, 1, 2).unwrap_or_default();
    let expires = now + chrono::Duration::days(14);
    for start in (0..count).step_by(500) {
        let range = start..(start + 500).min(count);
        patient::Entity::insert_many(range.clone().map(|i| patient::ActiveModel {
            id: Set(format!("sp{i}")),
            practice_id: Set("bench".into()),
            first_name: Set("Bench".into()),
            last_name: Set(format!("P{i}")),
            search_name: Set(format!("bench p{i}")),
            date_of_birth: Set(dob),
            mobile_phone: Set(Some(phone(i))),
            portal_enrolled: Set(false),
            sms_status: Set(SmsStatus::Pending),
            sms_status_reason: Set(None),
            last_activity_at: Set(None),
            active: Set(true),
            created_at: Set(now),
            updated_at: Set(now),
        }))
        .exec_without_returning(db)
        .await?;
        conversation::Entity::insert_many(range.clone().map(|i| conversation::ActiveModel {
            patient_id: Set(format!("sp{i}")),
            practice_id: Set("bench".into()),
            last_seq: Set(0),
            last_message_at: Set(None),
            created_at: Set(now),
        }))
        .exec_without_returning(db)
        .await?;
        sms_auth_session::Entity::insert_many(range.clone().map(|i| {
            sms_auth_session::ActiveModel {
                id: Set(format!("ss{i}")),
                patient_id: Set(format!("sp{i}")),
                practice_id: Set("bench".into()),
                phone: Set(phone(i)),
                status: Set(SmsAuthStatus::Pending),
                reason: Set(None),
                attempts: Set(0),
                started_by_user_id: Set(None),
                started_at: Set(now),
                last_sent_at: Set(now),
                expires_at: Set(expires),
                ended_at: Set(None),
            }
        }))
        .exec_without_returning(db)
        .await?;
        timer::Entity::insert_many(range.map(|i| timer::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            kind: Set(TimerKind::SmsAuthWindow),
            subject: Set(format!("ss{i}")),
            due_at: Set(expires),
            fired: Set(false),
            fired_at: Set(None),
            created_at: Set(now),
            patient_id: Set(Some(format!("sp{i}"))),
            user_id: Set(None),
            seq: Set(None),
            attempts: Set(0),
            dead: Set(false),
        }))
        .exec_without_returning(db)
        .await?;
    }
    Ok(())
}
