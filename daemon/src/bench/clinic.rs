//! `caremsgd bench clinic`: the traffic a clinic really sends, over real HTTP. A
//! practice with care teams, notifications and reminders on and half of its patients
//! SMS-enabled on the loopback gateway is seeded through the admin API and the real SMS
//! flow; staff event streams are held open; then a load generator on a runtime of its
//! own (its own threads, so its CPU is measured apart from the daemon's) drives the
//! clinic mix, then each request kind that the mix leans on alone.
//!
//! What it leaves out: email (no SMTP gateway), portal pushes (no portal gateway),
//! the patients' own DOB replies during the load (only during seeding), TLS, and
//! network latency (loopback).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use caremsg_entities::{delivery, message, notification};
use futures::{StreamExt, TryStreamExt};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Patients of the practice (all portal-enrolled; every second one SMS-enabled).
    pub patients: usize,
    /// Staff users the care teams are drawn from.
    pub users: usize,
    /// Users on each patient's care team.
    pub team: usize,
    /// Staff event streams held open during the mix.
    pub streams: usize,
    /// Extra portal-only patients whose care teams all hold the user `cbig` (one
    /// message each), for the list phase of a user on that many care teams.
    pub big_team: usize,
    /// Concurrent HTTP clients of the load generator.
    pub clients: usize,
    /// Seconds each phase runs.
    pub seconds: u64,
    /// Threads of the load generator's runtime.
    pub load_threads: usize,
    /// A PostgreSQL server to create a fresh database on, instead of SQLite.
    pub postgres: Option<String>,
    /// The streams' `events.coalesce`.
    pub coalesce: Duration,
}

/// A request kind of the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    PortalSend,
    StaffSend,
    InboundText,
    StaffOpen,
    StaffList,
    StaffListBigTeam,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::PortalSend => "portal send",
            Kind::StaffSend => "staff send",
            Kind::InboundText => "inbound text",
            Kind::StaffOpen => "staff opens conversation",
            Kind::StaffList => "staff patient list",
            Kind::StaffListBigTeam => "staff list, user on big team",
        }
    }

    /// The clinic mix: 40% portal sends, 20% staff sends, 10% inbound texts, 20%
    /// staff opening a conversation, 10% staff patient lists.
    fn of_mix(i: usize) -> Kind {
        match i % 10 {
            0..=3 => Kind::PortalSend,
            4 | 5 => Kind::StaffSend,
            6 => Kind::InboundText,
            7 | 8 => Kind::StaffOpen,
            _ => Kind::StaffList,
        }
    }

    fn writes_a_message(self) -> bool {
        matches!(self, Kind::PortalSend | Kind::StaffSend | Kind::InboundText)
    }
}

/// The figures of one phase.
#[derive(Debug, Clone, Default)]
struct Phase {
    name: &'static str,
    requests: usize,
    failed: usize,
    took: Duration,
    latencies: BTreeMap<Kind, Vec<Duration>>,
    acked_messages: u64,
    stored_messages: u64,
    notifications: u64,
    deliveries: u64,
    events: u64,
    // The streams' reads (each one chunk or more the daemon wrote).
    event_reads: u64,
    // How long after its portal send was answered a message reached the first
    // stream, sorted (the portal sends whose message that stream showed).
    event_delays: Vec<Duration>,
    daemon_cpu: Duration,
    writer: Writer,
}

/// The group-commit writer's totals (from its metrics), or their growth over a phase.
#[derive(Debug, Clone, Copy, Default)]
struct Writer {
    batches: f64,
    units: f64,
    commit_seconds: f64,
    // Batches that took 16 ms or less.
    within_16ms: f64,
}

impl Writer {
    fn read(metrics: &crate::metrics::Metrics) -> Self {
        let text = metrics.render();
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or(0.0)
        };
        Self {
            batches: value("caremsg_writer_batch_units_count"),
            units: value("caremsg_writer_batch_units_sum"),
            commit_seconds: value("caremsg_writer_commit_seconds_sum"),
            within_16ms: value("caremsg_writer_commit_seconds_bucket{le=\"0.016\"}"),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            batches: self.batches - before.batches,
            units: self.units - before.units,
            commit_seconds: self.commit_seconds - before.commit_seconds,
            within_16ms: self.within_16ms - before.within_16ms,
        }
    }
}

impl Phase {
    fn per_second(&self) -> f64 {
        (self.requests - self.failed) as f64 / self.took.as_secs_f64().max(1e-9)
    }

    fn cpu_per_request(&self) -> Duration {
        self.daemon_cpu / u32::try_from(self.requests.max(1)).unwrap_or(u32::MAX)
    }

    fn all(&self) -> Vec<Duration> {
        let mut all: Vec<Duration> = self.latencies.values().flatten().copied().collect();
        all.sort_unstable();
        all
    }
}

fn at(sorted: &[Duration], q: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Figures of the clinic benchmark.
#[derive(Debug, Clone)]
pub struct Report {
    plan: Plan,
    backend: &'static str,
    // Which SQLite ran (`sqlite_tuning::describe`, at the end).
    sqlite: String,
    seeding: Duration,
    phases: Vec<Phase>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.plan;
        writeln!(
            f,
            "clinic benchmark: {}, {} patients (half SMS-enabled), {} staff users, care teams of {} with New Patient Message and Unread Reminder on, plus {} portal-only patients with one message each on the care teams of one more user ({BIG_TEAM_USER}); {} HTTP clients on {} load thread(s); {} s per phase; seeded through the API in {:.1} s",
            self.backend,
            p.patients,
            p.users,
            p.team,
            p.big_team,
            p.clients,
            p.load_threads,
            p.seconds,
            self.seeding.as_secs_f64()
        )?;
        let postgres = self.backend == "PostgreSQL";
        if !postgres {
            writeln!(f, "  SQLite runs with {}", self.sqlite)?;
        }
        let (rate_target, p99_target) = if postgres {
            (1200.0, Duration::from_millis(100))
        } else {
            (2500.0, Duration::from_millis(50))
        };
        let portal_cpu = self
            .phases
            .iter()
            .find(|ph| ph.name == "portal sends only")
            .map(Phase::cpu_per_request);
        for phase in &self.phases {
            let all = phase.all();
            writeln!(f, "  {}:", phase.name)?;
            let is_mix = phase.name.starts_with("clinic mix");
            // The staff list's targets are SQLite's; none is set for PostgreSQL.
            let is_list = phase.name.starts_with("staff list only") && !postgres;
            let rate_verdict = if is_mix && phase.events > 0 || is_list {
                format!(
                    "   (target >= {rate_target:.0}: {})",
                    super::verdict(phase.per_second() >= rate_target)
                )
            } else {
                String::new()
            };
            writeln!(
                f,
                "    requests                       {:>10.0} /s{rate_verdict}",
                phase.per_second()
            )?;
            let p99_verdict = if is_mix && phase.events > 0 {
                format!(
                    "   (target < {} ms: {})",
                    p99_target.as_millis(),
                    super::verdict(at(&all, 0.99) < p99_target)
                )
            } else {
                String::new()
            };
            writeln!(
                f,
                "    latency p50 / p99              {:>7.2} / {:.2} ms{p99_verdict}",
                ms(at(&all, 0.5)),
                ms(at(&all, 0.99))
            )?;
            for (kind, latencies) in &phase.latencies {
                let mut sorted = latencies.clone();
                sorted.sort_unstable();
                writeln!(
                    f,
                    "      {:<28} {:>7} requests, p50 {:.2} ms, p99 {:.2} ms",
                    kind.label(),
                    sorted.len(),
                    ms(at(&sorted, 0.5)),
                    ms(at(&sorted, 0.99))
                )?;
            }
            writeln!(
                f,
                "    failed requests                {:>10}   (target 0: {})",
                phase.failed,
                super::verdict(phase.failed == 0)
            )?;
            writeln!(
                f,
                "    messages acknowledged / stored {:>10} / {}   ({:.0} stored/s; every acknowledged write stored: {})",
                phase.acked_messages,
                phase.stored_messages,
                phase.stored_messages as f64 / phase.took.as_secs_f64().max(1e-9),
                super::verdict(phase.acked_messages == phase.stored_messages)
            )?;
            writeln!(
                f,
                "    notifications / deliveries     {:>10} / {} created",
                phase.notifications, phase.deliveries
            )?;
            if is_mix {
                writeln!(
                    f,
                    "    event stream events delivered  {:>10}   (in {} reads, {:.1} events per read)",
                    phase.events,
                    phase.event_reads,
                    phase.events as f64 / phase.event_reads.max(1) as f64
                )?;
            }
            if !phase.event_delays.is_empty() {
                writeln!(
                    f,
                    "    event after the send's answer  p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms   ({} portal sends on the first stream; events.coalesce {} ms)",
                    ms(at(&phase.event_delays, 0.5)),
                    ms(at(&phase.event_delays, 0.99)),
                    ms(at(&phase.event_delays, 1.0)),
                    phase.event_delays.len(),
                    p.coalesce.as_millis()
                )?;
            }
            let ratio = match portal_cpu {
                Some(portal) if is_list && !portal.is_zero() => format!(
                    "   ({:.1}x a portal send's; target <= 2x: {})",
                    phase.cpu_per_request().as_secs_f64() / portal.as_secs_f64(),
                    super::verdict(
                        phase.cpu_per_request().as_secs_f64() <= 2.0 * portal.as_secs_f64()
                    )
                ),
                _ => String::new(),
            };
            writeln!(
                f,
                "    daemon CPU per request         {:>10.3} ms{ratio}",
                ms(phase.cpu_per_request())
            )?;
            let w = phase.writer;
            writeln!(
                f,
                "    writer batches                 {:>10.0}   ({:.1} units each, {:.2} ms per commit, {:.0} over 16 ms, busy {:.0}% of the phase)",
                w.batches,
                w.units / w.batches.max(1.0),
                w.commit_seconds * 1000.0 / w.batches.max(1.0),
                w.batches - w.within_16ms,
                w.commit_seconds * 100.0 / phase.took.as_secs_f64().max(1e-9)
            )?;
        }
        write!(
            f,
            "  (the daemon's CPU is the process's minus the load generator's threads)"
        )
    }
}

/// Runs the benchmark in a temporary state directory (and, for PostgreSQL, a
/// temporary database).
pub async fn run(plan: Plan) -> anyhow::Result<Report> {
    anyhow::ensure!(
        plan.team <= plan.users && plan.patients >= 2 && plan.clients > 0 && plan.users > 0,
        "a care team cannot be larger than the practice's staff, and the clinic needs patients"
    );
    anyhow::ensure!(
        plan.patients <= 9_999,
        "the loopback phone numbers of this benchmark allow at most 9,999 patients"
    );
    super::in_scratch_dir(|dir| async move {
        match plan.postgres.clone() {
            None => measure(plan, &dir, None).await,
            Some(server) => {
                super::with_postgres_database(&server, |url| measure(plan, &dir, Some(url))).await
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
    let backend = if database_url.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let library = crate::gateways::bench::default_library().context(
        "libcaremsg_sms_loopback.so was not found next to caremsgd; build it (cargo build --release)",
    )?;
    let mut settings = super::scratch_settings_with_gateways(dir)?;
    settings.database.url = database_url;
    settings.events.coalesce = plan.coalesce;
    for gateway in &mut settings.gateways {
        gateway.library = library.clone();
        gateway.config = serde_json::json!({ "outbox": dir.join("loopback-outbox.jsonl") });
    }
    let server = settings.server.clone();
    let running = crate::start(settings, crate::Options::default())
        .await
        .context("starting the daemon")?;
    let load = super::load_runtime(plan.load_threads)?;
    let base = format!("http://{}", running.local_addr());
    let result = async {
        let clinic = Arc::new(Clinic::new(&plan, &server)?);
        let started = Instant::now();
        {
            let (clinic, base) = (clinic.clone(), base.clone());
            load.spawn(async move { clinic.seed(&base).await })
                .await
                .context("the seeding task")??;
        }
        let seeding = started.elapsed();
        let db = running.state().db.clone();

        let mut phases = Vec::new();
        // The clinic mix without and with event streams, then the kinds alone.
        for (name, streams, pick) in [
            (
                "clinic mix, no event streams",
                0,
                Kind::of_mix as fn(usize) -> Kind,
            ),
            ("clinic mix with event streams", plan.streams, Kind::of_mix),
            ("portal sends only", 0, |_| Kind::PortalSend),
            ("staff list only", 0, |_| Kind::StaffList),
            (BIG_TEAM_PHASE, 0, |_| Kind::StaffListBigTeam),
            ("staff opens a conversation only", 0, |_| Kind::StaffOpen),
            ("staff sends only", 0, |_| Kind::StaffSend),
            ("inbound texts only", 0, |_| Kind::InboundText),
        ] {
            if name == "clinic mix with event streams" && streams == 0
                || name == BIG_TEAM_PHASE && plan.big_team == 0
            {
                continue;
            }
            // A clinic's database has planner statistics that autovacuum keeps up
            // with its size; this one grows from nothing in minutes, faster than
            // autovacuum follows, and PostgreSQL would keep plans made when a table
            // was empty (a sequential scan of `read_markers` per listed patient,
            // once the phases before have filled it). So each phase starts from
            // fresh statistics, as in a clinic's steady state.
            if db.get_database_backend() == sea_orm::DbBackend::Postgres {
                sea_orm::ConnectionTrait::execute_unprepared(&db, "ANALYZE")
                    .await
                    .context("ANALYZE before a phase")?;
            }
            let writer = Writer::read(&running.state().metrics);
            let mut phase =
                run_phase(&load, &db, &clinic, &base, name, streams, pick, &plan).await?;
            phase.writer = Writer::read(&running.state().metrics).since(writer);
            phases.push(phase);
        }
        Ok::<_, anyhow::Error>(Report {
            plan: plan.clone(),
            backend,
            sqlite: crate::sqlite_tuning::describe(),
            seeding,
            phases,
        })
    }
    .await;
    // Every load task has ended; a runtime cannot be dropped (nor shut down with a
    // wait) from inside another one.
    load.shutdown_background();
    running.shutdown().await?;
    result
}

/// The phase of the user on every big-team patient's care team.
const BIG_TEAM_PHASE: &str = "staff list only, one user on the big team's care teams";

/// The user on the care team of every big-team patient.
const BIG_TEAM_USER: &str = "cbig";

/// The seeded clinic: who is on which care team, which patients text.
struct Clinic {
    patients: usize,
    users: usize,
    team: usize,
    big_team: usize,
    client: reqwest::Client,
    next_id: AtomicU64,
    // While a phase with streams runs: when each portal send was answered, by
    // (patient, seq) (bounded by the phase's sends; emptied by each such phase).
    answered: Mutex<Option<HashMap<(usize, i64), Instant>>>,
}

impl Clinic {
    fn new(plan: &Plan, server: &caremsg_config::Server) -> reqwest::Result<Self> {
        Ok(Self {
            patients: plan.patients,
            users: plan.users,
            team: plan.team,
            big_team: plan.big_team,
            client: super::http_client(server, plan.clients + plan.streams)?,
            next_id: AtomicU64::new(0),
            answered: Mutex::new(None),
        })
    }

    /// The care team of patient `p`: `team` consecutive users starting at `p`.
    fn member(&self, p: usize, k: usize) -> String {
        format!("cu{}", (p + k) % self.users)
    }

    fn phone(p: usize) -> String {
        format!("+1201555{p:04}")
    }

    fn texts(p: usize) -> bool {
        p % 2 == 1
    }

    async fn put(&self, base: &str, path: &str, body: serde_json::Value) -> anyhow::Result<()> {
        super::admin_put(&self.client, base, path, body).await
    }

    /// The practice, its staff with notifications and reminders on, the patients
    /// through the admin API; then the SMS flow for every second patient: the staff's
    /// 'Text Messages' button and the patient's date-of-birth reply.
    async fn seed(&self, base: &str) -> anyhow::Result<()> {
        self.put(
            base,
            "/v1/admin/practices/clinic",
            serde_json::json!({
                "name": "Bench Family Clinic", "sms_enabled": true, "portal_enabled": true,
                "country": "US", "timezone": "America/New_York",
                "sms_numbers": [{"number": "+12015550100", "gateway": "loopback"}]}),
        )
        .await?;
        let users = (0..self.users).map(|u| format!("cu{u}"));
        let big = (self.big_team > 0).then(|| BIG_TEAM_USER.to_owned());
        for user in users.chain(big) {
            self.put(
                base,
                &format!("/v1/admin/users/{user}"),
                serde_json::json!({"practice_id": "clinic", "name": format!("Nurse {user}"),
                    "restricted_programs": []}),
            )
            .await?;
            let response = self
                .client
                .put(format!("{base}/v1/staff/settings/notifications"))
                .bearer_auth("dev-staff-token")
                .header("X-Caremsg-User", user)
                .json(&serde_json::json!({"new_patient_message": true, "unread_reminder": true}))
                .send()
                .await?;
            anyhow::ensure!(
                response.status().is_success(),
                "settings: {}",
                response.status()
            );
        }
        let patients = futures::stream::iter(0..self.patients)
            .map(|p| async move {
                let team: Vec<String> = (0..self.team).map(|k| self.member(p, k)).collect();
                self.put(
                    base,
                    &format!("/v1/admin/patients/cp{p}"),
                    serde_json::json!({"practice_id": "clinic", "first_name": "Bench",
                        "last_name": format!("Patient{p}"), "date_of_birth": "1950-03-07",
                        "mobile_phone": if Self::texts(p) { Some(Self::phone(p)) } else { None },
                        "portal_enrolled": true, "programs": [], "care_team": team}),
                )
                .await?;
                if !Self::texts(p) {
                    return Ok(());
                }
                let started = self
                    .client
                    .post(format!("{base}/v1/staff/patients/cp{p}/sms/start"))
                    .bearer_auth("dev-staff-token")
                    .header("X-Caremsg-User", self.member(p, 0))
                    .send()
                    .await?;
                anyhow::ensure!(
                    started.status().is_success(),
                    "sms/start: {}",
                    started.status()
                );
                self.inbound(base, p, "03/07/1950").await
            })
            .buffer_unordered(16);
        patients.try_collect::<Vec<()>>().await?;
        // The big team: portal-only patients with one message each, `cbig` on every
        // care team (with one clinic user, so the team is not only `cbig`).
        let big = futures::stream::iter(0..self.big_team)
            .map(|b| async move {
                self.put(
                    base,
                    &format!("/v1/admin/patients/cb{b}"),
                    serde_json::json!({"practice_id": "clinic", "first_name": "Big",
                        "last_name": format!("Team{b}"), "date_of_birth": "1960-05-01",
                        "portal_enrolled": true, "programs": [],
                        "care_team": [BIG_TEAM_USER, self.member(b, 0)]}),
                )
                .await?;
                let response = self
                    .client
                    .post(format!("{base}/v1/portal/patients/cb{b}/messages"))
                    .bearer_auth("dev-portal-token")
                    .json(&serde_json::json!({"body": "Is my referral in?"}))
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "big-team message: {}",
                    response.status()
                );
                Ok(())
            })
            .buffer_unordered(16);
        big.try_collect::<Vec<()>>().await?;
        Ok(())
    }

    async fn inbound(&self, base: &str, p: usize, body: &str) -> anyhow::Result<()> {
        let id = format!("bench-in-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let response = self
            .client
            .post(format!("{base}/v1/hooks/loopback"))
            .json(
                &serde_json::json!({"from": Self::phone(p), "to": "+12015550100",
                "body": body, "id": id}),
            )
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "inbound: {}",
            response.status()
        );
        Ok(())
    }

    /// One request of `kind` for request number `i`; whether it succeeded.
    async fn request(&self, base: &str, kind: Kind, i: usize) -> bool {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let p = (i.wrapping_mul(7919)) % self.patients;
        let user = self.member(p, i % self.team.max(1));
        let staff = |request: reqwest::RequestBuilder| {
            request
                .bearer_auth("dev-staff-token")
                .header("X-Caremsg-User", user.clone())
        };
        let sent = match kind {
            Kind::PortalSend => {
                self.client
                    .post(format!("{base}/v1/portal/patients/cp{p}/messages"))
                    .bearer_auth("dev-portal-token")
                    .json(
                        &serde_json::json!({"body": "Could someone call me about my refill?",
                        "client_txn_id": format!("bp{n}")}),
                    )
                    .send()
                    .await
            }
            Kind::StaffSend => {
                staff(
                    self.client
                        .post(format!("{base}/v1/staff/patients/cp{p}/messages")),
                )
                .json(
                    &serde_json::json!({"body": "We will call you this afternoon.",
                    "client_txn_id": format!("bs{n}")}),
                )
                .send()
                .await
            }
            Kind::InboundText => {
                // Only the SMS-enabled half texts.
                let p = p | 1;
                let p = if p >= self.patients { 1 } else { p };
                return self
                    .inbound(base, p, "Thank you, see you on Tuesday")
                    .await
                    .is_ok();
            }
            Kind::StaffOpen => {
                staff(self.client.get(format!(
                    "{base}/v1/staff/patients/cp{p}/conversation?limit=20"
                )))
                .send()
                .await
            }
            Kind::StaffList => {
                staff(
                    self.client
                        .get(format!("{base}/v1/staff/patients?limit=50")),
                )
                .send()
                .await
            }
            Kind::StaffListBigTeam => {
                self.client
                    .get(format!("{base}/v1/staff/patients?limit=50"))
                    .bearer_auth("dev-staff-token")
                    .header("X-Caremsg-User", BIG_TEAM_USER)
                    .send()
                    .await
            }
        };
        match sent {
            Ok(response) => {
                let ok = response.status().is_success();
                // Reads are consumed whole, as a client would.
                let Ok(answer) = response.bytes().await else {
                    return false;
                };
                if ok && kind == Kind::PortalSend {
                    self.answered(p, &answer);
                }
                ok
            }
            Err(_) => false,
        }
    }

    /// Notes when the portal send to patient `p` that stored `answer` was answered,
    /// while a phase with streams counts the events' delay.
    fn answered(&self, p: usize, answer: &[u8]) {
        let at = Instant::now();
        let mut answered = self.answered.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(answered) = answered.as_mut()
            && let Some(seq) = serde_json::from_slice::<serde_json::Value>(answer)
                .ok()
                .and_then(|v| v["seq"].as_i64())
        {
            answered.insert((p, seq), at);
        }
    }
}

/// The `message` events of `chunk` as (patient number, seq): `cp<p>` patients only.
fn messages_in(chunk: &[u8]) -> impl Iterator<Item = (usize, i64)> + '_ {
    chunk
        .split(|b| *b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data: "))
        .filter_map(|data| serde_json::from_slice::<serde_json::Value>(data).ok())
        .filter(|event| event.get("direction").is_some())
        .filter_map(|event| {
            let p = event["patient_id"]
                .as_str()?
                .strip_prefix("cp")?
                .parse()
                .ok()?;
            Some((p, event["seq"].as_i64()?))
        })
}

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    load: &tokio::runtime::Runtime,
    db: &sea_orm::DatabaseConnection,
    clinic: &Arc<Clinic>,
    base: &str,
    name: &'static str,
    streams: usize,
    pick: fn(usize) -> Kind,
    plan: &Plan,
) -> anyhow::Result<Phase> {
    let before = Counts::read(db).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    // When the first stream received each message (bounded by the phase's sends).
    let shown: Arc<Mutex<HashMap<(usize, i64), Instant>>> = Arc::default();
    if streams > 0 {
        *clinic.answered.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashMap::new());
    }
    let opened = Arc::new(AtomicUsize::new(0));
    let mut stream_tasks = Vec::new();
    for s in 0..streams {
        let (client, base, stop, events, reads, opened) = (
            clinic.client.clone(),
            base.to_owned(),
            stop.clone(),
            events.clone(),
            reads.clone(),
            opened.clone(),
        );
        let shown = (s == 0).then(|| shown.clone());
        let user = format!("cu{}", s % clinic.users);
        stream_tasks.push(load.spawn(async move {
            let response = client
                .get(format!("{base}/v1/staff/events"))
                .bearer_auth("dev-staff-token")
                .header("X-Caremsg-User", user)
                .send()
                .await;
            let Ok(response) = response else { return };
            if !response.status().is_success() {
                return;
            }
            opened.fetch_add(1, Ordering::Relaxed);
            let mut body = response.bytes_stream();
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), body.next()).await {
                    Ok(Some(Ok(chunk))) => {
                        let n = chunk.windows(6).filter(|w| w == b"event:").count();
                        events.fetch_add(n as u64, Ordering::Relaxed);
                        reads.fetch_add(1, Ordering::Relaxed);
                        if let Some(shown) = &shown {
                            let at = Instant::now();
                            let mut shown = shown.lock().unwrap_or_else(|e| e.into_inner());
                            for message in messages_in(&chunk) {
                                shown.entry(message).or_insert(at);
                            }
                        }
                    }
                    Ok(_) => return,
                    Err(_) => {}
                }
            }
        }));
    }
    // The streams are open before the load starts (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    while opened.load(Ordering::Relaxed) < streams && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let cpu_before = super::Cpu::read();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs(plan.seconds);
    let mut clients = Vec::new();
    for _ in 0..plan.clients {
        let (clinic, base, next) = (clinic.clone(), base.to_owned(), next.clone());
        clients.push(load.spawn(async move {
            let mut latencies: BTreeMap<Kind, Vec<Duration>> = BTreeMap::new();
            let (mut failed, mut acked) = (0usize, 0u64);
            while Instant::now() < until {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let kind = pick(i);
                let sent = Instant::now();
                let ok = clinic.request(&base, kind, i).await;
                latencies.entry(kind).or_default().push(sent.elapsed());
                if !ok {
                    failed += 1;
                } else if kind.writes_a_message() {
                    acked += 1;
                }
            }
            (latencies, failed, acked)
        }));
    }
    let mut phase = Phase {
        name,
        ..Phase::default()
    };
    for client in clients {
        let (latencies, failed, acked) = client.await.context("a load client")?;
        for (kind, l) in latencies {
            phase.requests += l.len();
            phase.latencies.entry(kind).or_default().extend(l);
        }
        phase.failed += failed;
        phase.acked_messages += acked;
    }
    phase.took = started.elapsed();
    let cpu_after = super::Cpu::read();
    phase.daemon_cpu = cpu_after.daemon().saturating_sub(cpu_before.daemon());
    // Events of the last commits may still be on their way: a bounded grace.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in stream_tasks {
        task.abort();
    }
    phase.events = events.load(Ordering::Relaxed);
    phase.event_reads = reads.load(Ordering::Relaxed);
    let answered = clinic
        .answered
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    let shown = std::mem::take(&mut *shown.lock().unwrap_or_else(|e| e.into_inner()));
    phase.event_delays = shown
        .iter()
        .filter_map(|(message, at)| Some(at.saturating_duration_since(*answered.get(message)?)))
        .collect();
    phase.event_delays.sort_unstable();
    let after = Counts::read(db).await?;
    phase.stored_messages = after.messages - before.messages;
    phase.notifications = after.notifications - before.notifications;
    phase.deliveries = after.deliveries - before.deliveries;
    Ok(phase)
}

/// Rows counted from the database before and after a phase.
struct Counts {
    messages: u64,
    notifications: u64,
    deliveries: u64,
}

impl Counts {
    async fn read(db: &sea_orm::DatabaseConnection) -> anyhow::Result<Self> {
        Ok(Self {
            messages: message::Entity::find()
                .filter(message::Column::Direction.ne(caremsg_entities::Direction::System))
                .count(db)
                .await?,
            notifications: notification::Entity::find().count(db).await?,
            deliveries: delivery::Entity::find().count(db).await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_message_events_of_the_clinics_patients_are_timed() {
        let chunk = b"event: message\ndata: {\"patient_id\":\"cp17\",\"seq\":4,\"direction\":\"from_patient\",\"channel\":\"portal\",\"body\":\"x\"}\n\n\
            event: notification\ndata: {\"id\":\"n1\",\"patient_id\":\"cp17\",\"kind\":\"new_patient_message\"}\n\n\
            event: message\ndata: {\"patient_id\":\"other\",\"seq\":1,\"direction\":\"from_patient\"}\n\n\
            event: message\ndata: {\"patient_id\":\"cp3\",\"seq\":9,\"direction\":\"to_patient\"}\n\n";
        let found: Vec<(usize, i64)> = messages_in(chunk).collect();
        assert_eq!(found, vec![(17, 4), (3, 9)]);
    }

    #[test]
    fn the_mix_has_the_clinic_shares() {
        let mut counts = BTreeMap::new();
        for i in 0..1000 {
            *counts.entry(Kind::of_mix(i)).or_insert(0) += 1;
        }
        assert_eq!(counts[&Kind::PortalSend], 400);
        assert_eq!(counts[&Kind::StaffSend], 200);
        assert_eq!(counts[&Kind::InboundText], 100);
        assert_eq!(counts[&Kind::StaffOpen], 200);
        assert_eq!(counts[&Kind::StaffList], 100);
    }
}
