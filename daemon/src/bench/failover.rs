//! `caremsgd bench failover`: active–passive failover under load, with real processes
//! (issue #17). Two `caremsgd run` children of this very executable share a fresh
//! PostgreSQL database with `ha.mode = "active-passive"` and the loopback SMS gateway;
//! a practice and its patients are seeded through the admin API; HTTP clients keep
//! sending portal messages (and every fifth a staff message), each retried with its
//! `client_txn_id` until a daemon acknowledges it, as a client behind a load balancer
//! would. After a measured window the active daemon is SIGKILLed, `kills` times,
//! alternating (the killed one is restarted as the new standby, as systemd would):
//! the takeover time is from the SIGKILL to the first 2xx from the other daemon, and
//! a window of messages/s is measured from then. At the end the database is read back:
//! every acknowledged message is stored exactly once.
//!
//! The child processes ([`ChildDaemon`], [`child_config`]) are the ones the failover
//! tests (`daemon/tests/failover.rs`) start too.
//!
//! What it leaves out: SMS traffic (no patient is SMS-enabled; outbound texts go to
//! the loopback file), a load balancer (the clients try each daemon in turn), TLS,
//! and network latency (loopback).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use sea_orm::{ConnectionTrait, Statement};

/// The target: from the SIGKILL of the active daemon to the first 2xx from
/// the other one.
pub const TAKEOVER_TARGET: Duration = Duration::from_secs(10);
/// The target: messages/s after a takeover at least this share of before.
const AFTER_TARGET: f64 = 0.8;
/// How long a daemon may take to start and report its role.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// The body prefix of the benchmark's messages (what the check reads back).
const BODY: &str = "failover bench message";
/// Staff users of the seeded practice (care teams of one, round robin).
const USERS: usize = 5;

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The PostgreSQL server the fresh database is created on (and dropped from).
    pub server: String,
    /// SIGKILLs of the active daemon.
    pub kills: usize,
    /// Concurrent HTTP clients.
    pub clients: usize,
    /// Patients the messages are spread over.
    pub patients: usize,
    /// Seconds of each measured window (before, and after each takeover).
    pub seconds: u64,
    /// The sms-loopback library; default: the one built next to caremsgd.
    pub library: Option<PathBuf>,
}

/// The configuration file of a child daemon in active-passive mode: the embedded
/// default with its state in `state_dir`, listening on `port`, the loopback gateway's
/// `library` writing to `outbox`, and the lease's renewal and expiry (`None`: the
/// defaults, 5 s and 15 s). The database comes from `CAREMSG__DATABASE__URL`.
pub fn child_config(
    state_dir: &Path,
    port: u16,
    library: &Path,
    outbox: &Path,
    lease: Option<(Duration, Duration)>,
) -> String {
    let mut text = String::new();
    for line in caremsg_config::EMBEDDED_DEFAULT.lines() {
        let line = if line.starts_with("state_dir = ") {
            format!("state_dir = {:?}", state_dir.display().to_string())
        } else if line.starts_with("listen = ") {
            format!("listen = \"127.0.0.1:{port}\"")
        } else if line.starts_with("public_url = ") {
            format!("public_url = \"http://127.0.0.1:{port}\"")
        } else if line.starts_with("library = ") && line.contains("caremsg_sms_loopback") {
            format!("library = {:?}", library.display().to_string())
        } else if line.starts_with("config = { outbox = ") {
            format!("config = {{ outbox = {:?} }}", outbox.display().to_string())
        } else {
            line.to_owned()
        };
        text.push_str(&line);
        text.push('\n');
    }
    // At the end a table header ends the last `[[gateways]]` entry.
    text.push_str("\n[ha]\nmode = \"active-passive\"\n");
    if let Some((renew, expiry)) = lease {
        text.push_str(&format!(
            "lease_renew = \"{}\"\nlease_expiry = \"{}\"\n",
            humantime::format_duration(renew),
            humantime::format_duration(expiry)
        ));
    }
    text
}

/// A free TCP port on loopback (kept for the daemon's life: a stepped-down daemon
/// re-executes itself and binds it again).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One `caremsgd run` child process with an [`child_config`] configuration; killed
/// (SIGKILL) and reaped when dropped.
pub struct ChildDaemon {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl ChildDaemon {
    /// Starts `exe` (a `caremsgd`) on `database_url` with its state directory `dir`
    /// (created; its configuration and its log, at `log_level`, go there), the loopback
    /// gateway's `library` and the shared `outbox`, the `lease` of [`child_config`],
    /// and further `CAREMSG__…` overrides in `env`.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        exe: &Path,
        dir: &Path,
        database_url: &str,
        library: &Path,
        outbox: &Path,
        lease: Option<(Duration, Duration)>,
        log_level: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).context("creating a daemon's state directory")?;
        let port = free_port().context("finding a free port")?;
        let config = dir.join("caremsg.toml");
        std::fs::write(&config, child_config(dir, port, library, outbox, lease))
            .context("writing a daemon's configuration")?;
        let log = dir.join("caremsgd.log");
        let stderr = std::fs::File::create(&log).context("creating a daemon's log")?;
        let child = Command::new(exe)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("CAREMSG__DATABASE__URL", database_url)
            .env("CAREMSG__LOG__LEVEL", log_level)
            .envs(env.iter().copied())
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        Ok(Self { child, port, log })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:{port}`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process, to signal or wait for.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// SIGKILL, and reap the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its log so far (the daemon logs no PHI).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/readyz`'s role (`active`, `standby`) when the daemon answers.
    pub async fn role(&self, http: &reqwest::Client) -> Option<String> {
        let response = http
            .get(format!("{}/readyz", self.base()))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let body: serde_json::Value = response.json().await.ok()?;
        body["role"].as_str().map(str::to_owned)
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One round: a SIGKILL of the active daemon.
#[derive(Debug, Clone)]
struct Round {
    takeover: Duration,
    per_second: f64,
}

/// Figures of the failover benchmark.
#[derive(Debug, Clone)]
pub struct Report {
    plan: Plan,
    lease: (Duration, Duration),
    before: f64,
    rounds: Vec<Round>,
    acked: usize,
    stored: usize,
    lost: usize,
    duplicated: usize,
    refused: u64,
}

impl Report {
    /// Whether every acknowledged message is stored exactly once.
    pub fn exactly_once(&self) -> bool {
        self.lost == 0 && self.duplicated == 0
    }

    fn after(&self) -> f64 {
        let n = self.rounds.len().max(1) as f64;
        self.rounds.iter().map(|r| r.per_second).sum::<f64>() / n
    }

    fn takeovers(&self) -> Vec<Duration> {
        let mut t: Vec<Duration> = self.rounds.iter().map(|r| r.takeover).collect();
        t.sort_unstable();
        t
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.plan;
        writeln!(
            f,
            "failover benchmark: PostgreSQL, 2 caremsgd processes (active-passive, lease renew {:?} / expiry {:?}), {} patients, {} HTTP clients (4 portal sends : 1 staff send, each retried until acknowledged), {} s windows",
            self.lease.0, self.lease.1, p.patients, p.clients, p.seconds
        )?;
        for (i, round) in self.rounds.iter().enumerate() {
            writeln!(
                f,
                "  round {:>2}: SIGKILL of the active daemon; takeover {:>6.2} s; {:>8.0} msgs/s after",
                i + 1,
                round.takeover.as_secs_f64(),
                round.per_second
            )?;
        }
        let takeovers = self.takeovers();
        let p50 = takeovers
            .get(takeovers.len().saturating_sub(1) / 2)
            .copied()
            .unwrap_or_default();
        let max = takeovers.last().copied().unwrap_or_default();
        writeln!(
            f,
            "  rounds                        {:>8}",
            self.rounds.len()
        )?;
        writeln!(
            f,
            "  takeover p50 / max            {:>8.2} / {:.2} s   (target < {} s: {})",
            p50.as_secs_f64(),
            max.as_secs_f64(),
            TAKEOVER_TARGET.as_secs(),
            super::verdict(!takeovers.is_empty() && max < TAKEOVER_TARGET)
        )?;
        writeln!(f, "  msgs/s before                 {:>8.0}", self.before)?;
        let lowest = self
            .rounds
            .iter()
            .map(|r| r.per_second)
            .fold(f64::INFINITY, f64::min);
        writeln!(
            f,
            "  msgs/s after takeover         {:>8.0}   (mean of the rounds; lowest {:.0})",
            self.after(),
            if lowest.is_finite() { lowest } else { 0.0 }
        )?;
        let ratio = self.after() / self.before.max(1e-9);
        writeln!(
            f,
            "  after / before                {:>8.0}%   (target >= {:.0}%: {})",
            ratio * 100.0,
            AFTER_TARGET * 100.0,
            super::verdict(ratio >= AFTER_TARGET)
        )?;
        writeln!(
            f,
            "  requests refused (retried)    {:>8}   (503 standby or no connection, during takeovers)",
            self.refused
        )?;
        write!(
            f,
            "  acknowledged / stored         {:>8} / {}; lost {}, duplicated {}   (every acknowledged message stored exactly once: {})",
            self.acked,
            self.stored,
            self.lost,
            self.duplicated,
            super::verdict(self.exactly_once())
        )
    }
}

/// Runs the benchmark on a fresh database of `plan.server`, in a temporary directory.
pub async fn run(plan: Plan) -> anyhow::Result<Report> {
    anyhow::ensure!(
        plan.kills > 0 && plan.clients > 0 && plan.patients > 0 && plan.seconds > 0,
        "kills, clients, patients and seconds must be at least 1"
    );
    anyhow::ensure!(
        plan.server.starts_with("postgres"),
        "failover needs a PostgreSQL server URL (postgres://…)"
    );
    let exe = std::env::current_exe().context("finding this executable")?;
    let library = plan
        .library
        .clone()
        .or_else(crate::gateways::bench::default_library)
        .context(
            "libcaremsg_sms_loopback.so was not found next to caremsgd; build it (cargo build --release) or pass --library",
        )?;
    super::in_scratch_dir(|dir| async move {
        let server = plan.server.clone();
        super::with_postgres_database(&server, |url| async move {
            measure(plan, &exe, &library, &dir, &url).await
        })
        .await
    })
    .await
}

/// The two daemons, by slot; the killed one's slot gets its replacement.
struct Pair {
    exe: PathBuf,
    dir: PathBuf,
    url: String,
    library: PathBuf,
    outbox: PathBuf,
    started: usize,
    slots: [ChildDaemon; 2],
}

impl Pair {
    fn spawn(&mut self) -> anyhow::Result<ChildDaemon> {
        self.started += 1;
        ChildDaemon::spawn(
            &self.exe,
            &self.dir.join(format!("d{}", self.started)),
            &self.url,
            &self.library,
            &self.outbox,
            None,
            "warn",
            &[],
        )
    }

    /// Waits until one slot is active and the other standby; the active slot.
    async fn one_active(&self, http: &reqwest::Client) -> anyhow::Result<usize> {
        let started = Instant::now();
        loop {
            let roles = (
                self.slots[0].role(http).await,
                self.slots[1].role(http).await,
            );
            match (roles.0.as_deref(), roles.1.as_deref()) {
                (Some("active"), Some("standby")) => return Ok(0),
                (Some("standby"), Some("active")) => return Ok(1),
                (Some("active"), Some("active")) => anyhow::bail!("two active daemons"),
                _ => {}
            }
            if started.elapsed() > START_DEADLINE {
                anyhow::bail!(
                    "no single active daemon after {START_DEADLINE:?}; logs:\n{}\n---\n{}",
                    self.slots[0].logs(),
                    self.slots[1].logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The load: clients, what they got acknowledged, where they send.
struct Load {
    http: reqwest::Client,
    bases: RwLock<[String; 2]>,
    preferred: AtomicUsize,
    patients: usize,
    next: AtomicU64,
    acked: AtomicU64,
    refused: AtomicU64,
    stop: AtomicBool,
}

impl Load {
    fn bases(&self) -> [String; 2] {
        self.bases
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// One message, retried (same `client_txn_id`) on whichever daemon serves until
    /// one acknowledges it; its number, or None when the load stopped first or a
    /// daemon refused it for good (4xx).
    async fn send_one(&self) -> Option<u64> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let p = (n as usize).wrapping_mul(7919) % self.patients;
        let body =
            serde_json::json!({"body": format!("{BODY} {n}"), "client_txn_id": format!("fb{n}")});
        while !self.stop.load(Ordering::Relaxed) {
            let bases = self.bases();
            let first = self.preferred.load(Ordering::Relaxed) % 2;
            for slot in [first, 1 - first] {
                let base = &bases[slot];
                let request = if n % 5 == 4 {
                    self.http
                        .post(format!("{base}/v1/staff/patients/fp{p}/messages"))
                        .bearer_auth("dev-staff-token")
                        .header("X-Caremsg-User", format!("fu{}", p % USERS))
                } else {
                    self.http
                        .post(format!("{base}/v1/portal/patients/fp{p}/messages"))
                        .bearer_auth("dev-portal-token")
                };
                match request.json(&body).send().await {
                    Ok(response) if response.status().is_success() => {
                        self.preferred.store(slot, Ordering::Relaxed);
                        self.acked.fetch_add(1, Ordering::Relaxed);
                        return Some(n);
                    }
                    Ok(response) if response.status().is_client_error() => {
                        tracing::warn!(status = %response.status(), "bench failover: a send was refused");
                        return None;
                    }
                    _ => {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Neither daemon serves (a takeover): as a client would, a short pause.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Messages acknowledged within `window`.
    async fn rate(&self, window: Duration) -> f64 {
        let (before, started) = (self.acked.load(Ordering::Relaxed), Instant::now());
        tokio::time::sleep(window).await;
        let acked = self.acked.load(Ordering::Relaxed) - before;
        acked as f64 / started.elapsed().as_secs_f64().max(1e-9)
    }
}

async fn measure(
    plan: Plan,
    exe: &Path,
    library: &Path,
    dir: &Path,
    url: &str,
) -> anyhow::Result<Report> {
    let settings = caremsg_config::from_toml_str(caremsg_config::EMBEDDED_DEFAULT)?;
    let lease = (settings.ha.lease_renew, settings.ha.lease_expiry);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(plan.clients + 4)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let first = |name: &str| {
        ChildDaemon::spawn(
            exe,
            &dir.join(name),
            url,
            library,
            &dir.join("outbox.jsonl"),
            None,
            "warn",
            &[],
        )
    };
    let slots = [first("a")?, first("b")?];
    let mut pair = Pair {
        exe: exe.to_owned(),
        dir: dir.to_owned(),
        url: url.to_owned(),
        library: library.to_owned(),
        outbox: dir.join("outbox.jsonl"),
        started: 0,
        slots,
    };
    let active = pair.one_active(&http).await?;
    seed(&http, &pair.slots[active].base(), plan.patients).await?;

    let load = Arc::new(Load {
        http: http.clone(),
        bases: RwLock::new([pair.slots[0].base(), pair.slots[1].base()]),
        preferred: AtomicUsize::new(active),
        patients: plan.patients,
        next: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let clients: Vec<_> = (0..plan.clients)
        .map(|_| {
            let load = load.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                while !load.stop.load(Ordering::Relaxed) {
                    if let Some(n) = load.send_one().await {
                        acked.push(n);
                    }
                }
                acked
            })
        })
        .collect();

    let window = Duration::from_secs(plan.seconds);
    let result = async {
        // Warm-up: actors loaded, connections open.
        load.rate(window.min(Duration::from_secs(2))).await;
        let before = load.rate(window).await;
        let mut rounds = Vec::new();
        for _ in 0..plan.kills {
            let active = pair.one_active(&http).await?;
            let survivor = 1 - active;
            pair.slots[active].kill();
            let killed = Instant::now();
            let takeover = first_2xx(&http, &pair.slots[survivor], killed).await?;
            // The killed daemon comes back as the standby (as systemd restarts it),
            // while the window after the takeover is measured.
            pair.slots[active] = pair.spawn()?;
            *load
                .bases
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                [pair.slots[0].base(), pair.slots[1].base()];
            let per_second = load.rate(window).await;
            rounds.push(Round {
                takeover,
                per_second,
            });
        }
        Ok::<_, anyhow::Error>((before, rounds))
    }
    .await;
    load.stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for client in clients {
        acked.extend(client.await.context("a load client")?);
    }
    let (before, rounds) = result?;

    // Every acknowledged message stored exactly once (read while the daemons run:
    // nothing is in flight any more).
    let db = sea_orm::Database::connect(url)
        .await
        .context("connecting to the benchmark database")?;
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "SELECT body, count(*) AS n FROM messages WHERE body LIKE $1 GROUP BY body",
            [format!("{BODY} %").into()],
        ))
        .await?;
    let mut stored = std::collections::HashMap::new();
    for row in rows {
        let body: String = row.try_get("", "body")?;
        let n: i64 = row.try_get("", "n")?;
        stored.insert(body, n);
    }
    db.close().await?;
    let lost = acked
        .iter()
        .filter(|n| !stored.contains_key(&format!("{BODY} {n}")))
        .count();
    let duplicated = stored.values().filter(|n| **n > 1).count();
    Ok(Report {
        plan,
        lease,
        before,
        rounds,
        acked: acked.len(),
        stored: stored.len(),
        lost,
        duplicated,
        refused: load.refused.load(Ordering::Relaxed),
    })
}

/// Polls `survivor` with a staff request until it answers 2xx; the time since
/// `killed`.
async fn first_2xx(
    http: &reqwest::Client,
    survivor: &ChildDaemon,
    killed: Instant,
) -> anyhow::Result<Duration> {
    let url = format!("{}/v1/staff/patients?limit=1", survivor.base());
    loop {
        let answer = http
            .get(&url)
            .bearer_auth("dev-staff-token")
            .header("X-Caremsg-User", "fu0")
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if answer.is_ok_and(|r| r.status().is_success()) {
            return Ok(killed.elapsed());
        }
        if killed.elapsed() > START_DEADLINE {
            anyhow::bail!(
                "the standby did not take over within {START_DEADLINE:?}; its log:\n{}",
                survivor.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The practice, its staff and `patients` portal patients (care teams of one),
/// through the admin API.
async fn seed(http: &reqwest::Client, base: &str, patients: usize) -> anyhow::Result<()> {
    let put = |path: String, body: serde_json::Value| async move {
        super::admin_put(http, base, &path, body).await
    };
    put(
        "/v1/admin/practices/fo".into(),
        serde_json::json!({
            "name": "Failover Bench Clinic", "sms_enabled": true, "portal_enabled": true,
            "country": "US", "timezone": "America/New_York",
            "sms_numbers": [{"number": "+12015550100", "gateway": "loopback"}]}),
    )
    .await?;
    for u in 0..USERS {
        put(
            format!("/v1/admin/users/fu{u}"),
            serde_json::json!({"practice_id": "fo", "name": format!("Nurse {u}"),
                "restricted_programs": []}),
        )
        .await?;
    }
    futures::stream::iter(0..patients)
        .map(|p| {
            put(
                format!("/v1/admin/patients/fp{p}"),
                serde_json::json!({"practice_id": "fo", "first_name": "Bench",
                    "last_name": format!("Patient{p}"), "date_of_birth": "1950-03-07",
                    "portal_enrolled": true, "programs": [], "care_team": [format!("fu{}", p % USERS)]}),
            )
        })
        .buffer_unordered(16)
        .fold(
            Ok(()),
            |acc: anyhow::Result<()>, r| async move { acc.and(r) },
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_configuration_is_valid_and_active_passive() {
        let text = child_config(
            Path::new("/tmp/x"),
            9999,
            Path::new("/lib/libcaremsg_sms_loopback.so"),
            Path::new("/tmp/x/outbox.jsonl"),
            Some((Duration::from_secs(1), Duration::from_secs(3))),
        );
        // Active-passive needs PostgreSQL: the children get the URL from the environment.
        let text = text.replace(
            "[database]",
            "[database]\nurl = \"postgres://u@127.0.0.1/db\"",
        );
        let settings = caremsg_config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.ha.mode, caremsg_config::HaMode::ActivePassive);
        assert_eq!(settings.ha.lease_expiry, Duration::from_secs(3));
        assert_eq!(settings.server.listen.port(), 9999);
        assert_eq!(settings.gateways.len(), 1);
        assert_eq!(
            settings.gateways[0].library,
            Path::new("/lib/libcaremsg_sms_loopback.so")
        );
    }
}
