//! `caremsgd bench conversations`: portal sends through the real HTTP API to many
//! patients, and the memory of a live conversation actor.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use caremsg_entities::{SmsStatus, conversation, patient, practice};
use chrono::{NaiveDate, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::EntityTrait;

use crate::actors::conversation::Ping;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Patients the messages are spread over.
    pub patients: usize,
    /// Messages to send.
    pub messages: usize,
    /// Concurrent HTTP clients.
    pub clients: usize,
    /// Conversations to activate for the memory figure.
    pub actors: usize,
}

/// Figures of the conversations benchmark.
#[derive(Debug, Clone)]
pub struct Report {
    plan: Plan,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    failures: usize,
    bytes_per_actor: f64,
    actors_live: usize,
    ceiling: f64,
    writer: String,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        writeln!(
            f,
            "conversations benchmark: SQLite, {} patients, {} portal messages over HTTP from {} clients",
            self.plan.patients, self.plan.messages, self.plan.clients
        )?;
        writeln!(
            f,
            "  acknowledged, durably stored     {:>10.0} messages/s   (target >= 5,000: {})",
            self.per_second,
            super::verdict(self.per_second >= 5000.0)
        )?;
        writeln!(
            f,
            "  latency p50                      {:>10.2} ms",
            ms(self.p50)
        )?;
        writeln!(
            f,
            "  latency p99                      {:>10.2} ms          (target < 50 ms: {})",
            ms(self.p99),
            super::verdict(self.p99 < Duration::from_millis(50))
        )?;
        writeln!(
            f,
            "  failed requests                  {:>10}",
            self.failures
        )?;
        writeln!(f, "  writer                           {}", self.writer)?;
        writeln!(
            f,
            "  ceiling (1,000-row INSERTs)      {:>10.0} rows/s (the write benchmark's baseline, this run)",
            self.ceiling
        )?;
        write!(
            f,
            "  memory per live actor            {:>10.0} bytes  ({} actors live; target < 4,096: {})",
            self.bytes_per_actor,
            self.actors_live,
            super::verdict(self.bytes_per_actor < 4096.0)
        )
    }
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs the benchmark in a temporary state directory.
pub async fn run(plan: Plan) -> anyhow::Result<Report> {
    super::in_scratch_dir(|dir| async move { measure(plan, &dir).await }).await
}

async fn measure(plan: Plan, dir: &std::path::Path) -> anyhow::Result<Report> {
    let ceiling = super::write_ceiling(dir, 50_000).await?;
    let mut settings = super::scratch_settings(dir)?;
    // Every conversation stays in memory: the memory figure is per live actor.
    settings.conversations.max_live = settings
        .conversations
        .max_live
        .max(plan.patients + plan.actors + 1);
    let server = settings.server.clone();
    let running = crate::start(settings, crate::Options::default())
        .await
        .context("starting the daemon")?;
    let result = async {
        seed(&running.state().db, plan.patients + plan.actors).await?;
        let base = format!("http://{}", running.local_addr());
        let client = super::http_client(&server, plan.clients)?;
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..plan.clients {
            let (client, base, next) = (client.clone(), base.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= plan.messages {
                        break;
                    }
                    let url = format!("{base}/v1/portal/patients/bp{}/messages", i % plan.patients);
                    let sent = Instant::now();
                    let response = client
                        .post(url)
                        .bearer_auth("dev-portal-token")
                        .json(&serde_json::json!({"body": "How do I take the new prescription?", "client_txn_id": format!("b{i}")}))
                        .send()
                        .await;
                    latencies.push(sent.elapsed());
                    if !response.is_ok_and(|r| r.status() == reqwest::StatusCode::CREATED) {
                        failures += 1;
                    }
                }
                (latencies, failures)
            }));
        }
        let mut latencies = Vec::with_capacity(plan.messages);
        let mut failures = 0;
        for task in tasks {
            let (l, f) = task.await?;
            latencies.extend(l);
            failures += f;
        }
        let took = started.elapsed();
        let writer = super::writer_summary(&running.state().metrics.render());
        latencies.sort_unstable();
        let at = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q) as usize).copied().unwrap_or_default();

        // Memory: activate `actors` more conversations with a no-op message. RSS after
        // minus before: the allocator may first reuse memory freed earlier in the run,
        // so a small `actors` gives a lower bound (100,000 gives a stable figure).
        let conversations = &running.state().conversations;
        let before_live = conversations.live();
        let before = rss_bytes().unwrap_or(0);
        for i in 0..plan.actors {
            conversations.send(&format!("bp{}", plan.patients + i), Ping).await?;
        }
        let after = rss_bytes().unwrap_or(0);
        let added = conversations.live().saturating_sub(before_live).max(1);
        Ok::<_, anyhow::Error>(Report {
            plan,
            per_second: (plan.messages - failures) as f64 / took.as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
            failures,
            bytes_per_actor: after.saturating_sub(before) as f64 / added as f64,
            actors_live: conversations.live(),
            ceiling,
            writer,
        })
    }
    .await;
    running.shutdown().await?;
    result
}

/// `total` portal-enrolled patients `bp0…` of one practice, inserted directly (the
/// benchmark measures sends, not set-up).
async fn seed(db: &sea_orm::DatabaseConnection, total: usize) -> anyhow::Result<()> {
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
    let dob = NaiveDate::from_ymd_opt(1950, 1, 1).unwrap_or_default();
    for start in (0..total).step_by(1000) {
        let ids: Vec<String> = (start..(start + 1000).min(total))
            .map(|i| format!("bp{i}"))
            .collect();
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
    }
    Ok(())
}
