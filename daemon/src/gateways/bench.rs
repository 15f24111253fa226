//! `caremsgd bench gateways`: queued deliveries through the real daemon and the
//! `sms-loopback` plugin, rate limits off, on a fresh SQLite file; and the cost of one
//! call across the FFI boundary.
//!
//! The daemon is started with [`crate::start`] (the production path), the deliveries
//! are inserted directly (all due at once), and the dispatcher drains them: every
//! delivery is claimed, sent (one JSON line appended to the outbox file each) and
//! recorded `sent` through the writer. The FFI figures call a second loopback
//! instance whose outbox is `/dev/null`: a no-op `health` call (the bare boundary
//! crossing) and a whole `send` (the plugin's own work included).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use caremsg_config::{Gateway, GatewayKind, Settings};
use caremsg_entities::{
    DeliveryChannel, DeliveryPurpose, DeliveryStatus, SmsStatus, delivery, patient, practice,
};
use caremsg_plugin_host::{CallError, Outbound};
use chrono::{NaiveDate, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryTrait};

use super::outbox;

/// The instance the deliveries go through.
const INSTANCE: &str = "bench-loopback";
/// The instance the FFI figures call (its outbox is `/dev/null`).
const NULL_INSTANCE: &str = "bench-null";
/// Calls per FFI figure.
const FFI_CALLS: u32 = 200_000;
/// The benchmark fails rather than wait longer for its deliveries.
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);
/// Target: deliveries per second, end to end on SQLite.
const TARGET_RATE: f64 = 5_000.0;
/// Target: microseconds per no-op call across the boundary.
const TARGET_FFI_US: f64 = 5.0;

/// Figures of the gateways benchmark.
#[derive(Debug, Clone)]
pub struct GatewaysReport {
    /// Deliveries sent.
    pub deliveries: usize,
    /// The plugin instance's concurrency.
    pub concurrency: usize,
    /// Deliveries per second, from all due to all recorded `sent`.
    pub rate: f64,
    /// Mean microseconds of a no-op call (`health`) across the boundary.
    pub noop_call_us: f64,
    /// Mean microseconds of one loopback `send` to `/dev/null`.
    pub send_call_us: f64,
}

impl std::fmt::Display for GatewaysReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        writeln!(
            f,
            "gateways benchmark: SQLite (WAL, synchronous=FULL), sms-loopback, rate limits off, \
             {} deliveries, concurrency {}",
            self.deliveries, self.concurrency
        )?;
        writeln!(
            f,
            "  deliveries end to end            {:>10.0} /s   (target >= {:.0}/s: {})",
            self.rate,
            TARGET_RATE,
            verdict(self.rate >= TARGET_RATE)
        )?;
        writeln!(
            f,
            "  no-op plugin call (health), FFI  {:>10.3} µs   (target < {TARGET_FFI_US:.0} µs: {})",
            self.noop_call_us,
            verdict(self.noop_call_us < TARGET_FFI_US)
        )?;
        write!(
            f,
            "  loopback send to /dev/null       {:>10.2} µs   (the plugin's own work included)",
            self.send_call_us
        )
    }
}

/// The loopback library built next to this executable (`target/<profile>/deps` for a
/// `cargo build`/`cargo run` of the daemon, or `target/<profile>`).
pub fn default_library() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let name = format!(
        "{}caremsg_sms_loopback{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    [dir.join("deps").join(&name), dir.join(&name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// Runs the benchmark with `deliveries` deliveries through `library`.
pub async fn run(
    deliveries: usize,
    concurrency: usize,
    library: Option<PathBuf>,
) -> anyhow::Result<GatewaysReport> {
    let library = library.or_else(default_library).context(
        "libcaremsg_sms_loopback.so was not found next to caremsgd; build it (cargo build) or pass --library",
    )?;
    let dir = std::env::temp_dir().join(format!("caremsg-bench-gw-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).context("creating the benchmark directory")?;
    let result = measure(&dir, &library, deliveries, concurrency).await;
    if let Err(err) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(error = %err, "The benchmark directory could not be removed.");
    }
    result
}

fn settings(dir: &Path, library: &Path, concurrency: usize) -> Settings {
    let gateway = |name: &str, outbox: PathBuf| Gateway {
        name: name.to_owned(),
        kind: GatewayKind::Sms,
        library: library.to_owned(),
        config: serde_json::json!({ "outbox": outbox }),
        concurrency,
        allowed_hosts: Vec::new(),
        rate_limit: None,
        per_recipient: None,
        auto_answers_per_sender: None,
        health_interval: std::time::Duration::from_secs(30),
        down_fails_readiness: false,
    };
    let mut settings = Settings {
        state_dir: dir.to_owned(),
        ..Settings::default()
    };
    settings.server.listen = ([127, 0, 0, 1], 0).into();
    settings.gateways = vec![
        gateway(INSTANCE, dir.join("outbox.jsonl")),
        gateway(NULL_INSTANCE, PathBuf::from("/dev/null")),
    ];
    settings
}

async fn measure(
    dir: &Path,
    library: &Path,
    deliveries: usize,
    concurrency: usize,
) -> anyhow::Result<GatewaysReport> {
    let running = crate::start(
        settings(dir, library, concurrency),
        crate::Options::default(),
    )
    .await
    .context("starting the daemon")?;
    let state = running.state().clone();
    let result = async {
        seed(&state, deliveries).await?;
        let started = Instant::now();
        loop {
            let report = outbox::drain(&state, INSTANCE).await?;
            anyhow::ensure!(
                report.failed == 0 && report.retried == 0 && report.refused == 0,
                "deliveries did not go out: {report:?}"
            );
            // The background dispatcher takes its share too: stop once none is left.
            let left = delivery::Entity::find()
                .filter(delivery::Column::Status.ne(DeliveryStatus::Sent))
                .count(&state.db)
                .await?;
            if left == 0 {
                break;
            }
            let queued = delivery::Entity::find()
                .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
                .count(&state.db)
                .await?;
            anyhow::ensure!(
                (report.claimed > 0 || queued > 0) && started.elapsed() < GIVE_UP_AFTER,
                "{left} deliveries did not go out"
            );
        }
        let took = started.elapsed();
        let stored = delivery::Entity::find()
            .filter(delivery::Column::Status.eq(DeliveryStatus::Sent))
            .count(&state.db)
            .await?;
        anyhow::ensure!(
            stored == deliveries as u64,
            "{stored} of {deliveries} deliveries are recorded sent"
        );
        let gateway = state
            .gateways
            .instance(NULL_INSTANCE)
            .cloned()
            .context("the /dev/null instance is missing")?;
        let noop = gateway
            .call(|instance| {
                let started = Instant::now();
                for _ in 0..FFI_CALLS {
                    instance.health()?;
                }
                Ok::<Duration, CallError>(started.elapsed())
            })
            .await?;
        let send = gateway
            .call(|instance| {
                let outbound = Outbound {
                    delivery_id: "bench".into(),
                    to: "+12015550123".into(),
                    from: "+12015550100".into(),
                    body: "A benchmark text of ordinary length, about one line.".into(),
                    idempotency_key: "bench".into(),
                    subject: None,
                    attempt: 1,
                };
                let started = Instant::now();
                for _ in 0..FFI_CALLS {
                    instance.send(&outbound)?;
                }
                Ok::<Duration, CallError>(started.elapsed())
            })
            .await?;
        let per_call = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(FFI_CALLS);
        Ok(GatewaysReport {
            deliveries,
            concurrency,
            rate: deliveries as f64 / took.as_secs_f64().max(1e-9),
            noop_call_us: per_call(noop),
            send_call_us: per_call(send),
        })
    }
    .await;
    running.shutdown().await?;
    result
}

/// A practice, an SMS-enabled patient and `n` due SMS deliveries, inserted directly.
async fn seed(state: &crate::state::Shared, n: usize) -> anyhow::Result<()> {
    let now = Utc::now();
    practice::Entity::insert(practice::ActiveModel {
        id: Set("bench-practice".into()),
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
    .exec_without_returning(&state.db)
    .await?;
    patient::Entity::insert(patient::ActiveModel {
        id: Set("bench-patient".into()),
        practice_id: Set("bench-practice".into()),
        first_name: Set("Bench".into()),
        last_name: Set("Patient".into()),
        search_name: Set("bench patient".into()),
        date_of_birth: Set(NaiveDate::from_ymd_opt(1950, 1, 1).unwrap_or_default()),
        mobile_phone: Set(Some("+12015550123".into())),
        portal_enrolled: Set(false),
        sms_status: Set(SmsStatus::Enabled),
        sms_status_reason: Set(None),
        last_activity_at: Set(None),
        active: Set(true),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec_without_returning(&state.db)
    .await?;
    // Not due until all are in, so the background dispatcher does not start early.
    let later = now + chrono::TimeDelta::days(1);
    let rows: Vec<delivery::ActiveModel> = (0..n)
        .map(|_| delivery::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            message_id: Set(None),
            notification_id: Set(None),
            patient_id: Set(Some("bench-patient".into())),
            practice_id: Set("bench-practice".into()),
            channel: Set(DeliveryChannel::Sms),
            purpose: Set(DeliveryPurpose::SmsAuth),
            gateway: Set(Some(INSTANCE.into())),
            recipient: Set(Some("+12015550123".into())),
            from_number: Set(Some("+12015550100".into())),
            subject: Set(None),
            body: Set(Some(
                "A benchmark text of ordinary length, about one line.".into(),
            )),
            status: Set(DeliveryStatus::Queued),
            attempts: Set(0),
            next_attempt_at: Set(later),
            claimed_at: Set(None),
            provider_message_id: Set(None),
            error_code: Set(None),
            error_reason: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .collect();
    for chunk in rows.chunks(1_000) {
        delivery::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(&state.db)
            .await?;
    }
    let due = delivery::Entity::update_many()
        .col_expr(delivery::Column::NextAttemptAt, Expr::value(now))
        .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
        .into_query();
    state.db.execute(&due).await?;
    Ok(())
}
