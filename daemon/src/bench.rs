//! Benchmarks, run as `caremsgd bench <which>`: each prints its figures and the ratio
//! against its baseline measured in the same run, on this machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use caremsg_entities::{conversation, message, patient, practice};
use chrono::{NaiveDate, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::{DatabaseConnection, EntityTrait, TransactionTrait};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::writer::{WriteUnit, Writer, WriterOptions};

mod clinic;
mod conversations;
mod events;
pub mod failover;
mod notifications;
mod sms_auth;

/// Which benchmark to run.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Which {
    /// The write path: one transaction per write vs the group-commit writer vs the
    /// multi-row INSERT ceiling, on SQLite.
    Write {
        /// Message rows to write in each variant.
        #[arg(long, default_value_t = 50_000)]
        rows: usize,
        /// Concurrent writing tasks.
        #[arg(long, default_value_t = 64)]
        tasks: usize,
    },
    /// A restart with many pending SMS authentications (time to ready, memory), then
    /// date-of-birth replies through the inbound entry point, on SQLite.
    SmsAuth {
        /// Pending sessions at the restart.
        #[arg(long, default_value_t = 100_000)]
        sessions: usize,
        /// Correct date-of-birth replies fed afterwards.
        #[arg(long, default_value_t = 20_000)]
        replies: usize,
    },
    /// Portal sends through the real HTTP API spread over many patients, on SQLite:
    /// messages/s, latency, and memory per live conversation actor.
    Conversations {
        /// Patients the messages are spread over.
        #[arg(long, default_value_t = 10_000)]
        patients: usize,
        /// Messages to send.
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
        /// Concurrent HTTP clients.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Further conversations to activate for the memory figure.
        #[arg(long, default_value_t = 100_000)]
        actors: usize,
    },
    /// The outbox: queued SMS deliveries through the real daemon and the sms-loopback
    /// plugin, rate limits off, on SQLite; and the cost of one plugin call across the
    /// FFI boundary.
    Gateways {
        /// Deliveries to send.
        #[arg(long, default_value_t = 50_000)]
        deliveries: usize,
        /// The plugin instance's concurrency.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// The sms-loopback library; default: the one built next to caremsgd.
        #[arg(long)]
        library: Option<std::path::PathBuf>,
    },
    /// Staff notifications through the real daemon, on SQLite (or PostgreSQL): portal
    /// messages through the conversation actors to patients whose care teams are all
    /// notified (in-app notifications/s), then every streak's unread reminder overdue
    /// at once after a restart (time until all are delivered in-app).
    Notifications {
        /// Patients.
        #[arg(long, default_value_t = 10_000)]
        patients: usize,
        /// Users in each patient's care team.
        #[arg(long, default_value_t = 10)]
        team: usize,
        /// Staff users the care teams are drawn from.
        #[arg(long, default_value_t = 1_000)]
        users: usize,
        /// Portal messages, spread evenly over the patients.
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        /// Concurrent senders.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Run on a fresh database created (and dropped) on this PostgreSQL server,
        /// e.g. `postgres://postgres@127.0.0.1:5432/postgres`, instead of SQLite.
        #[arg(long)]
        postgres: Option<String>,
    },
    /// Event streams: the CPU per portal message with no staff stream open and with
    /// `streams` open (one per user; care teams of five), on SQLite.
    Events {
        /// Staff users (one patient per five of them, each with a care team of five).
        #[arg(long, default_value_t = 2_000)]
        users: usize,
        /// Staff event streams to hold open, one per user, from the first user on (at
        /// most `users`; 0 runs the same rounds as a control, no stream ever open).
        #[arg(long, default_value_t = 2_000)]
        streams: usize,
        /// Portal messages per measured round.
        #[arg(long, default_value_t = 5_000)]
        messages: usize,
        /// Concurrent senders of the warm-up round, which finds the rate the measured
        /// rounds are sent at (and of every round with `--rate 0`).
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Messages per second in the measured rounds, each sent when it falls due (an
        /// open loop, as patients send). Default: half the rate the warm-up round
        /// reached; at least 1. 0: every round a closed loop of `--clients` senders.
        #[arg(long)]
        rate: Option<f64>,
        /// The streams' `events.coalesce`, in milliseconds (default: the daemon's
        /// default).
        #[arg(long)]
        coalesce_ms: Option<u64>,
    },
    /// The traffic a clinic really sends, over real HTTP, seeded through the admin API
    /// and the real SMS flow: the clinic mix with and without staff event streams, then
    /// each request kind alone; requests/s, latency per kind, the daemon's CPU per
    /// request, and a check that every acknowledged write is stored.
    Clinic {
        /// Patients (all portal-enrolled, every second one SMS-enabled).
        #[arg(long, default_value_t = 2_000)]
        patients: usize,
        /// Staff users the care teams are drawn from.
        #[arg(long, default_value_t = 20)]
        users: usize,
        /// Users on each patient's care team.
        #[arg(long, default_value_t = 5)]
        team: usize,
        /// Staff event streams held open during the mix.
        #[arg(long, default_value_t = 50)]
        streams: usize,
        /// Portal-only patients, each with one message, whose care teams all hold one
        /// more user, for the phase "staff list only, one user on N care teams" (0
        /// skips it).
        #[arg(long, default_value_t = 10_000)]
        big_team: usize,
        /// Concurrent HTTP clients.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds each phase runs.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Threads of the load generator (its CPU is not counted as the daemon's).
        #[arg(long, default_value_t = 1)]
        load_threads: usize,
        /// Run on a fresh database created (and dropped) on this PostgreSQL server,
        /// e.g. `postgres://postgres@127.0.0.1:5432/postgres`, instead of SQLite.
        #[arg(long)]
        postgres: Option<String>,
        /// The streams' `events.coalesce`, in milliseconds (default: the daemon's
        /// default).
        #[arg(long)]
        coalesce_ms: Option<u64>,
    },
    /// Active–passive failover with two real `caremsgd` processes on one fresh
    /// PostgreSQL database: portal and staff sends over HTTP, the active daemon
    /// SIGKILLed `kills` times; takeover time, messages/s before and after, and a check
    /// that every acknowledged message is stored exactly once.
    Failover {
        /// The PostgreSQL server the fresh database is created on (and dropped from).
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
        postgres: String,
        /// SIGKILLs of the active daemon (alternating: the killed one comes back as
        /// the standby).
        #[arg(long, default_value_t = 5)]
        kills: usize,
        /// Concurrent HTTP clients.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Patients the messages are spread over.
        #[arg(long, default_value_t = 1_000)]
        patients: usize,
        /// Seconds of each measured window (before, and after each takeover).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// The sms-loopback library; default: the one built next to caremsgd.
        #[arg(long)]
        library: Option<std::path::PathBuf>,
    },
}

/// Runs one benchmark and prints its report.
pub async fn run(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Write { rows, tasks } => {
            let report = write(rows, tasks).await?;
            println!("{report}");
            Ok(())
        }
        Which::SmsAuth { sessions, replies } => {
            println!("{}", sms_auth::run(sessions, replies).await?);
            Ok(())
        }
        Which::Conversations {
            patients,
            messages,
            clients,
            actors,
        } => {
            let plan = conversations::Plan {
                patients,
                messages,
                clients,
                actors,
            };
            println!("{}", conversations::run(plan).await?);
            Ok(())
        }
        Which::Gateways {
            deliveries,
            concurrency,
            library,
        } => {
            let report = crate::gateways::bench::run(deliveries, concurrency, library).await?;
            println!("{report}");
            Ok(())
        }
        Which::Notifications {
            patients,
            team,
            users,
            messages,
            clients,
            postgres,
        } => {
            let plan = notifications::Plan {
                patients,
                team,
                users,
                messages,
                clients,
            };
            let backend = postgres.map_or(
                notifications::Backend::Sqlite,
                notifications::Backend::Postgres,
            );
            println!("{}", notifications::run(plan, backend).await?);
            Ok(())
        }
        Which::Events {
            users,
            streams,
            messages,
            clients,
            rate,
            coalesce_ms,
        } => {
            let plan = events::Plan {
                users,
                streams,
                messages,
                clients,
                rate,
                coalesce: coalesce(coalesce_ms),
            };
            println!("{}", events::run(plan).await?);
            Ok(())
        }
        Which::Clinic {
            patients,
            users,
            team,
            streams,
            big_team,
            clients,
            seconds,
            load_threads,
            postgres,
            coalesce_ms,
        } => {
            let plan = clinic::Plan {
                patients,
                users,
                team,
                streams,
                big_team,
                clients,
                seconds,
                load_threads,
                postgres,
                coalesce: coalesce(coalesce_ms),
            };
            println!("{}", clinic::run(plan).await?);
            Ok(())
        }
        Which::Failover {
            postgres,
            kills,
            clients,
            patients,
            seconds,
            library,
        } => {
            let plan = failover::Plan {
                server: postgres,
                kills,
                clients,
                patients,
                seconds,
                library,
            };
            println!("{}", failover::run(plan).await?);
            Ok(())
        }
    }
}

/// Figures of the write benchmark.
#[derive(Debug, Clone, Copy)]
pub struct WriteReport {
    /// Rows written per variant.
    pub rows: usize,
    /// Concurrent tasks.
    pub tasks: usize,
    /// (a) one transaction per row, rows/s.
    pub per_transaction: f64,
    /// (b) the group-commit writer, rows/s.
    pub group_commit: f64,
    /// (c) one task, 1,000-row INSERT statements, one per transaction, rows/s.
    pub ceiling: f64,
}

impl std::fmt::Display for WriteReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let speedup = self.group_commit / self.per_transaction;
        let of_ceiling = self.group_commit / self.ceiling;
        writeln!(
            f,
            "write benchmark: SQLite (WAL, synchronous=FULL), {} message rows, {} tasks",
            self.rows, self.tasks
        )?;
        writeln!(
            f,
            "  (a) one transaction per write      {:>10.0} rows/s",
            self.per_transaction
        )?;
        writeln!(
            f,
            "  (b) group-commit writer            {:>10.0} rows/s",
            self.group_commit
        )?;
        writeln!(
            f,
            "  (c) ceiling: 1,000-row INSERTs     {:>10.0} rows/s",
            self.ceiling
        )?;
        writeln!(
            f,
            "  b/a = {speedup:.1}x   (target >= 10x: {})",
            verdict(speedup >= 10.0)
        )?;
        write!(
            f,
            "  b/c = {:.0}%   (target >= 25%: {})",
            of_ceiling * 100.0,
            verdict(of_ceiling >= 0.25)
        )
    }
}

/// `PUT base+path` with the development admin token and a JSON body: how the
/// benchmarks seed their clinics through the admin API. Anything but 2xx is an error
/// naming the path.
pub(crate) async fn admin_put(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<()> {
    let response = client
        .put(format!("{base}{path}"))
        .bearer_auth("dev-admin-token")
        .json(&body)
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "seeding {path}: {}",
        response.status()
    );
    Ok(())
}

/// Runs `work` in a fresh scratch directory under the system's temporary folder and
/// removes it afterwards, whatever `work` returned.
pub(crate) async fn in_scratch_dir<T, Fut>(
    work: impl FnOnce(std::path::PathBuf) -> Fut,
) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let dir = std::env::temp_dir().join(format!("caremsg-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).context("creating the benchmark directory")?;
    let result = work(dir.clone()).await;
    if let Err(err) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(error = %err, "The benchmark directory could not be removed.");
    }
    result
}

/// The settings of a benchmark daemon: the embedded default with its state in `dir`,
/// an ephemeral port, no gateways, and large write batches.
pub(crate) fn scratch_settings(dir: &std::path::Path) -> anyhow::Result<caremsg_config::Settings> {
    let mut settings = scratch_settings_with_gateways(dir)?;
    settings.gateways.clear();
    Ok(settings)
}

/// [`scratch_settings`] keeping the embedded default's gateways (the loopback SMS
/// gateway), for the caller to point at its library.
pub(crate) fn scratch_settings_with_gateways(
    dir: &std::path::Path,
) -> anyhow::Result<caremsg_config::Settings> {
    let text = caremsg_config::EMBEDDED_DEFAULT
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = {:?}", dir.display().to_string()),
        )
        .replace("listen = \"127.0.0.1:8680\"", "listen = \"127.0.0.1:0\"");
    let mut settings = caremsg_config::from_toml_str(&text)?;
    settings.log.level = "warn".into();
    settings.writer.max_batch_units = 1024;
    Ok(settings)
}

/// The HTTP client of a benchmark's load: at most `max_idle` pooled connections, each
/// let go once it has been unused for half the daemon's `server.idle_timeout`. The
/// daemon closes a connection idle that long; a request sent on it at that moment is
/// lost ("connection closed before message completed"), and a benchmark stops on its
/// first lost request. reqwest's own default keeps connections 90 s, longer than the
/// daemon's 60: a run slowed down (a profiler, a loaded machine) failed that way.
pub(crate) fn http_client(
    server: &caremsg_config::Server,
    max_idle: usize,
) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(max_idle)
        .pool_idle_timeout(client_idle(server))
        .build()
}

/// How long [`http_client`] keeps an unused connection.
fn client_idle(server: &caremsg_config::Server) -> Duration {
    server.idle_timeout / 2
}

/// "N batches, M units/batch, T ms/commit" from the writer's histograms.
pub(crate) fn writer_summary(metrics: &str) -> String {
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    let batches = value("caremsg_writer_batch_units_count ");
    let units = value("caremsg_writer_batch_units_sum ");
    let seconds = value("caremsg_writer_commit_seconds_sum ");
    format!(
        "{batches:.0} batches, {:.1} units/batch, {:.2} ms/batch",
        units / batches.max(1.0),
        seconds * 1000.0 / batches.max(1.0)
    )
}

/// Runs `work` on a fresh database created on the PostgreSQL server at `server` (its
/// URL is handed to `work`) and drops that database afterwards, whatever `work`
/// returned.
pub(crate) async fn with_postgres_database<T, Fut>(
    server: &str,
    work: impl FnOnce(String) -> Fut,
) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    use sea_orm::ConnectionTrait;
    let name = format!("caremsg_bench_{}", uuid::Uuid::new_v4().simple());
    let admin = sea_orm::Database::connect(server)
        .await
        .context("connecting to the PostgreSQL server")?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await?;
    let base = server.rsplit_once('/').map_or(server, |(b, _)| b);
    let result = work(format!("{base}/{name}")).await;
    if let Err(err) = admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
    {
        tracing::warn!(error = %err, "The benchmark database could not be dropped.");
    }
    result
}

/// The name of the load generator's threads: their CPU is not the daemon's.
const LOAD_THREAD: &str = "bench-load";

/// The load generator's own runtime, on `threads` threads named [`LOAD_THREAD`], so
/// that [`Cpu`] tells its CPU from the daemon's. Shut it down with
/// `shutdown_background` (a runtime cannot be dropped inside another).
pub(crate) fn load_runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(LOAD_THREAD)
        .enable_all()
        .build()
        .context("starting the load generator's runtime")
}

/// CPU time of this process, of the load generator's threads, and of the daemon's
/// writer thread.
pub(crate) struct Cpu {
    process: Duration,
    load: Duration,
    writer: Duration,
}

impl Cpu {
    pub(crate) fn read() -> Self {
        let process = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .map_or(Duration::ZERO, |s| ticks(&s));
        let (mut load, mut writer) = (Duration::ZERO, Duration::ZERO);
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                let sum = match comm.trim() {
                    LOAD_THREAD => &mut load,
                    crate::writer::THREAD_NAME => &mut writer,
                    _ => continue,
                };
                if let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) {
                    *sum += ticks(&stat);
                }
            }
        }
        Self {
            process,
            load,
            writer,
        }
    }

    /// The daemon's writer thread's CPU.
    pub(crate) fn writer(&self) -> Duration {
        self.writer
    }

    pub(crate) fn daemon(&self) -> Duration {
        self.process.saturating_sub(self.load)
    }

    /// Waits until the daemon is idle: 200 ms in which `/proc` charged it no CPU (it
    /// counts in 10 ms ticks, so an idle daemon is one using well under 5% of a core),
    /// for at most 10 s. Work a round leaves behind (the WAL checkpointer's copy of
    /// what it wrote, say) then counts in that round, not in whichever round comes
    /// next; a round that follows another at once would otherwise pay for its
    /// predecessor's tail, one that follows a pause would not.
    pub(crate) async fn settle() {
        const WINDOW: Duration = Duration::from_millis(200);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut before = Cpu::read().daemon();
        while std::time::Instant::now() < deadline {
            tokio::time::sleep(WINDOW).await;
            let now = Cpu::read().daemon();
            if now == before {
                return;
            }
            before = now;
        }
    }
}

/// utime + stime of a `/proc/…/stat` line, at Linux's 100 ticks per second.
pub(crate) fn ticks(stat: &str) -> Duration {
    // The command name may hold spaces: the fields start after its closing ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // After ')': state is field 0; utime and stime are fields 11 and 12.
    Duration::from_millis((field(11) + field(12)) * 10)
}

/// A benchmark's `--coalesce-ms`, or the daemon's default `events.coalesce`.
fn coalesce(ms: Option<u64>) -> Duration {
    ms.map_or_else(
        || caremsg_config::Events::default().coalesce,
        Duration::from_millis,
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

const PATIENT: &str = "bench-patient";

/// Measures the three write variants, each on a fresh SQLite file.
pub async fn write(rows: usize, tasks: usize) -> anyhow::Result<WriteReport> {
    in_scratch_dir(|dir| async move {
        let per_transaction = {
            let db = fresh_db(&dir, "a").await?;
            let seq = Arc::new(AtomicI64::new(0));
            let started = Instant::now();
            let mut handles = Vec::new();
            for t in 0..tasks {
                let (db, seq) = (db.clone(), seq.clone());
                let share = rows / tasks + usize::from(t < rows % tasks);
                handles.push(tokio::spawn(async move {
                    for _ in 0..share {
                        let txn = db.begin().await?;
                        message::Entity::insert(message(seq.fetch_add(1, Ordering::Relaxed) + 1))
                            .exec_without_returning(&txn)
                            .await?;
                        txn.commit().await?;
                    }
                    Ok::<_, sea_orm::DbErr>(())
                }));
            }
            for handle in handles {
                handle.await??;
            }
            rate(rows, started.elapsed())
        };
        let group_commit = {
            // The schema and the practice (through the readers' pool), then the
            // daemon's writer on SQLite: its own connection on its thread.
            fresh_db(&dir, "b").await?;
            let stop = CancellationToken::new();
            let (writer, task) = Writer::start_sqlite(
                crate::writer::SqliteStore::new(&dir.join("b.db"), Duration::from_secs(30)),
                WriterOptions {
                    max_batch_units: 1024,
                    queue_depth: 8192,
                },
                Arc::new(Metrics::new()),
                stop.clone(),
            )?;
            let seq = Arc::new(AtomicI64::new(0));
            let started = Instant::now();
            let mut handles = Vec::new();
            for t in 0..tasks {
                let (writer, seq) = (writer.clone(), seq.clone());
                let share = rows / tasks + usize::from(t < rows % tasks);
                handles.push(tokio::spawn(async move {
                    for _ in 0..share {
                        let row = message(seq.fetch_add(1, Ordering::Relaxed) + 1);
                        writer.write(WriteUnit::new().insert(row)).await?;
                    }
                    Ok::<_, crate::writer::WriteError>(())
                }));
            }
            for handle in handles {
                handle.await??;
            }
            let took = started.elapsed();
            stop.cancel();
            task.join().await;
            rate(rows, took)
        };
        let ceiling = write_ceiling(&dir, rows).await?;
        Ok(WriteReport {
            rows,
            tasks,
            per_transaction,
            group_commit,
            ceiling,
        })
    })
    .await
}

/// The ceiling: one task inserting `rows` message rows as 1,000-row INSERT
/// statements, one per transaction, on a fresh SQLite file in `dir`; rows/s.
pub async fn write_ceiling(dir: &std::path::Path, rows: usize) -> anyhow::Result<f64> {
    let db = fresh_db(dir, "ceiling").await?;
    let started = Instant::now();
    let mut next = 1;
    while next <= rows as i64 {
        let end = (next + 1000).min(rows as i64 + 1);
        let txn = db.begin().await?;
        message::Entity::insert_many((next..end).map(message))
            .exec_without_returning(&txn)
            .await?;
        txn.commit().await?;
        next = end;
    }
    let took = started.elapsed();
    db.close().await?;
    Ok(rate(rows, took))
}

fn rate(rows: usize, took: Duration) -> f64 {
    rows as f64 / took.as_secs_f64().max(1e-9)
}

async fn fresh_db(dir: &std::path::Path, name: &str) -> anyhow::Result<DatabaseConnection> {
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.join(format!("{name}.db")).display()
    );
    let options = crate::db::DbOptions {
        url,
        max_connections: 8,
        busy_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(10),
    };
    let db = crate::db::connect(&options).await?;
    crate::db::migrate(&db).await?;
    let now = Utc::now();
    practice::Entity::insert(practice::ActiveModel {
        id: Set("bench-practice".into()),
        name: Set("Bench Clinic".into()),
        sms_enabled: Set(true),
        portal_enabled: Set(true),
        country: Set("US".into()),
        timezone: Set("America/New_York".into()),
        sign_outbound_sms: Set(false),
        active: Set(true),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec_without_returning(&db)
    .await?;
    patient::Entity::insert(patient::ActiveModel {
        id: Set(PATIENT.into()),
        practice_id: Set("bench-practice".into()),
        first_name: Set("Bench".into()),
        last_name: Set("Patient".into()),
        search_name: Set("bench patient".into()),
        date_of_birth: Set(NaiveDate::from_ymd_opt(1950, 1, 1).unwrap_or_default()),
        mobile_phone: Set(None),
        portal_enrolled: Set(true),
        sms_status: Set(caremsg_entities::SmsStatus::None),
        sms_status_reason: Set(None),
        last_activity_at: Set(None),
        active: Set(true),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec_without_returning(&db)
    .await?;
    conversation::Entity::insert(conversation::ActiveModel {
        patient_id: Set(PATIENT.into()),
        practice_id: Set("bench-practice".into()),
        last_seq: Set(0),
        last_message_at: Set(None),
        created_at: Set(now),
    })
    .exec_without_returning(&db)
    .await?;
    Ok(db)
}

fn message(seq: i64) -> message::ActiveModel {
    message::ActiveModel {
        id: Set(uuid::Uuid::now_v7().to_string()),
        patient_id: Set(PATIENT.into()),
        seq: Set(seq),
        direction: Set(caremsg_entities::Direction::FromPatient),
        channel: Set(caremsg_entities::Channel::Portal),
        author_user_id: Set(None),
        body: Set("A benchmark message of ordinary length, about one line.".into()),
        client_txn_key: Set(None),
        gateway: Set(None),
        provider_message_id: Set(None),
        possible_opt_out: Set(false),
        read_by_patient_at: Set(None),
        created_at: Set(Utc::now()),
    }
}

#[cfg(test)]
mod cpu_tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat = "42 (bench load) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(ticks(stat), Duration::from_millis(3000));
    }

    #[test]
    fn the_load_lets_go_of_a_connection_well_before_the_daemon_would() {
        let settings = caremsg_config::from_toml_str(caremsg_config::EMBEDDED_DEFAULT).unwrap();
        for idle in [1, 60, 3_600] {
            let server = caremsg_config::Server {
                idle_timeout: Duration::from_secs(idle),
                ..settings.server.clone()
            };
            assert!(client_idle(&server) * 2 <= server.idle_timeout, "{idle} s");
            assert!(http_client(&server, 4).is_ok());
        }
    }
}
