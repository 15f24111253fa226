//! Active–passive failover on one PostgreSQL database (issue #17), with real
//! `caremsgd` processes: exactly one active, the standby answers 503; a frozen
//! (SIGSTOP) active loses the role and, resumed, commits nothing; a daemon whose lock
//! connection PostgreSQL ends steps down; and, with `CAREMSG_FAULTS=1`, SIGKILL rounds
//! under load.
//!
//! They run only when `DATABASE_URL` names a PostgreSQL server (each test makes its own
//! database); on SQLite high availability is refused by the configuration.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_caremsgd");
/// The target from the loss of the active daemon to the standby serving.
const TARGET: Duration = Duration::from_secs(10);
const ADMIN: &str = "dev-admin-token";

/// The PostgreSQL server, when the suite runs against one.
fn server_url() -> Option<String> {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| url.starts_with("postgres"))
}

/// A database of this test's own on the server; dropped at the end.
struct TestDb {
    admin: String,
    name: String,
}

impl TestDb {
    async fn create(admin: String) -> Self {
        let name = format!("caremsg_ha_{}", uuid::Uuid::new_v4().simple());
        let db = Database::connect(&admin).await.unwrap();
        db.execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        db.close().await.unwrap();
        Self { admin, name }
    }

    fn url(&self) -> String {
        let base = self
            .admin
            .rsplit_once('/')
            .map_or(self.admin.as_str(), |(b, _)| b);
        format!("{base}/{}", self.name)
    }

    async fn connect(&self) -> DatabaseConnection {
        Database::connect(&self.url()).await.unwrap()
    }

    async fn drop(self) {
        if let Ok(db) = Database::connect(&self.admin).await {
            let _ = db
                .execute_unprepared(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await;
            let _ = db.close().await;
        }
    }
}

/// A free TCP port on loopback (fixed for the daemon's life: a stepped-down daemon
/// re-executes itself and binds it again).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn loopback_library() -> PathBuf {
    caremsg_testplugins::library_path(caremsg_testplugins::SMS_LOOPBACK).unwrap()
}

/// One `caremsgd run` process.
struct Daemon {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Daemon {
    /// Starts a daemon on `db` with its own state directory under `dir`, the shared
    /// loopback outbox `outbox`, and a short lease (renew 1 s, expiry 3 s).
    fn start(dir: &Path, name: &str, db: &TestDb, outbox: &Path) -> Self {
        let state = dir.join(name);
        std::fs::create_dir_all(&state).unwrap();
        let port = free_port();
        let mut text = String::new();
        for line in caremsg_config::EMBEDDED_DEFAULT.lines() {
            let line = if line.starts_with("state_dir = ") {
                format!("state_dir = {:?}", state.display().to_string())
            } else if line.starts_with("listen = ") {
                format!("listen = \"127.0.0.1:{port}\"")
            } else if line.starts_with("library = ") && line.contains("caremsg_sms_loopback") {
                format!("library = {:?}", loopback_library().display().to_string())
            } else if line.starts_with("config = { outbox = ") {
                format!("config = {{ outbox = {:?} }}", outbox.display().to_string())
            } else {
                line.to_owned()
            };
            text.push_str(&line);
            text.push('\n');
        }
        // `[ha]` before the gateways' array of tables would also do; at the end a
        // table header ends the last `[[gateways]]` entry.
        text.push_str(
            "\n[ha]\nmode = \"active-passive\"\nlease_renew = \"1s\"\nlease_expiry = \"3s\"\n",
        );
        let config = state.join("caremsg.toml");
        std::fs::write(&config, text).unwrap();
        let log = state.join("caremsgd.log");
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env("CAREMSG__DATABASE__URL", db.url())
            .env("CAREMSG__LOG__LEVEL", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, port, log }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.pid()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {}", self.pid());
    }

    /// SIGKILL, and reap the process.
    fn kill(&mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for a clean exit.
    fn stop(&mut self) {
        self.signal("-TERM");
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "exit after SIGTERM: {status:?}\n{}",
            self.logs()
        );
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/readyz`: Some("active"/"standby") when the daemon answers.
    async fn role(&self, http: &reqwest::Client) -> Option<String> {
        let response = http
            .get(format!("{}/readyz", self.base()))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let body: Value = response.json().await.ok()?;
        body["role"].as_str().map(str::to_owned)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Polls until `daemon` reports `role`; the time it took. Panics after `within`.
async fn until_role(
    http: &reqwest::Client,
    daemon: &Daemon,
    role: &str,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        if daemon.role(http).await.as_deref() == Some(role) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "not {role} within {within:?}; its log:\n{}",
            daemon.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until one of `a`, `b` is active and the other standby; (active, standby).
async fn one_active<'a>(
    http: &reqwest::Client,
    a: &'a Daemon,
    b: &'a Daemon,
) -> (&'a Daemon, &'a Daemon) {
    let started = Instant::now();
    loop {
        match (a.role(http).await.as_deref(), b.role(http).await.as_deref()) {
            (Some("active"), Some("standby")) => return (a, b),
            (Some("standby"), Some("active")) => return (b, a),
            (Some("active"), Some("active")) => panic!("two active daemons"),
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no single active daemon; logs:\n{}\n---\n{}",
            a.logs(),
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn put_practice(
    http: &reqwest::Client,
    daemon: &Daemon,
    id: &str,
) -> reqwest::Result<reqwest::Response> {
    http.put(format!("{}/v1/admin/practices/{id}", daemon.base()))
        .bearer_auth(ADMIN)
        .json(&json!({
            "name": format!("Clinic {id}"), "sms_enabled": true, "portal_enabled": true,
            "country": "US", "timezone": "America/New_York",
            "sms_numbers": [{"number": number_of(id), "gateway": "loopback"}],
        }))
        .send()
        .await
}

/// A practice's own (fictional) sending number.
fn number_of(id: &str) -> String {
    let n = id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % 10_000;
    format!("+1201555{n:04}")
}

async fn scalar(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap();
    row.try_get_by_index::<i64>(0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_one_active_the_standby_503s_and_takes_over_on_stop() {
    let Some(server) = server_url() else { return };
    let db = TestDb::create(server).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.jsonl");
    let http = client();
    let a = Daemon::start(dir.path(), "a", &db, &outbox);
    let b = Daemon::start(dir.path(), "b", &db, &outbox);
    let (active, standby) = one_active(&http, &a, &b).await;

    // The standby: /healthz ok, /readyz 503 standby, every /v1 request 503 standby
    // with Retry-After; the active one serves.
    let health = http
        .get(format!("{}/healthz", standby.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = http
        .get(format!("{}/readyz", standby.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(
        ready.json::<Value>().await.unwrap(),
        json!({"status": "unavailable", "role": "standby"})
    );
    let refused = put_practice(&http, standby, "p1").await.unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().get("retry-after").is_some());
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error"]["code"],
        "standby"
    );
    let ready = http
        .get(format!("{}/readyz", active.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap()["role"], "active");
    assert_eq!(
        put_practice(&http, active, "p1").await.unwrap().status(),
        200
    );

    // Manual failover (`systemctl stop`): the stopped one releases the lease, the
    // standby takes over at once.
    let (mut active, standby) = if active.port == a.port {
        (a, b)
    } else {
        (b, a)
    };
    let epoch_before = scalar(&db.connect().await, "SELECT epoch FROM ha_lease").await;
    let stopped = Instant::now();
    active.stop();
    until_role(&http, &standby, "active", TARGET).await;
    println!("takeover after SIGTERM: {:?}", stopped.elapsed());
    assert_eq!(
        put_practice(&http, &standby, "p2").await.unwrap().status(),
        200
    );
    let conn = db.connect().await;
    assert_eq!(
        scalar(&conn, "SELECT epoch FROM ha_lease").await,
        epoch_before + 1
    );
    assert_eq!(scalar(&conn, "SELECT count(*) FROM practices").await, 2);
    conn.close().await.unwrap();
    drop(standby);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_active_loses_the_lease_and_resumed_commits_nothing() {
    let Some(server) = server_url() else { return };
    let db = TestDb::create(server).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.jsonl");
    let http = client();
    let a = Daemon::start(dir.path(), "a", &db, &outbox);
    let b = Daemon::start(dir.path(), "b", &db, &outbox);
    let (active, standby) = one_active(&http, &a, &b).await;
    assert_eq!(
        put_practice(&http, active, "before")
            .await
            .unwrap()
            .status(),
        200
    );

    // Frozen past the lease's expiry: the standby ends the holder's sessions and
    // takes over.
    active.signal("-STOP");
    let frozen = Instant::now();
    // A request sent to the frozen daemon waits in its socket's backlog.
    let late = tokio::spawn({
        let http = http.clone();
        let base = active.base();
        async move {
            http.put(format!("{base}/v1/admin/practices/late"))
                .bearer_auth(ADMIN)
                .timeout(Duration::from_secs(60))
                .json(&json!({
                    "name": "Clinic late", "sms_enabled": true, "portal_enabled": true,
                    "country": "US", "timezone": "America/New_York",
                    "sms_numbers": [{"number": number_of("late"), "gateway": "loopback"}],
                }))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    until_role(&http, standby, "active", TARGET + Duration::from_secs(3)).await;
    let takeover = frozen.elapsed();
    println!("takeover after SIGSTOP (lease expiry 3 s): {takeover:?}");
    assert!(takeover < TARGET, "{takeover:?}");
    assert_eq!(
        put_practice(&http, standby, "after")
            .await
            .unwrap()
            .status(),
        200
    );

    // Resumed: its writes fail the epoch guard, it notices and becomes standby.
    active.signal("-CONT");
    let late = late.await.unwrap();
    assert!(
        !matches!(late, Ok(200..=299)),
        "the resumed old active acknowledged a write: {late:?}"
    );
    until_role(&http, active, "standby", TARGET).await;
    assert_eq!(standby.role(&http).await.as_deref(), Some("active"));
    let conn = db.connect().await;
    assert_eq!(
        scalar(&conn, "SELECT count(*) FROM practices WHERE id = 'late'").await,
        0,
        "the old active committed after the takeover"
    );
    assert_eq!(scalar(&conn, "SELECT count(*) FROM practices").await, 2);
    conn.close().await.unwrap();
    assert!(active.logs().contains("steps down"), "{}", active.logs());
    drop((a, b));
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_whose_lock_connection_is_terminated_steps_down() {
    let Some(server) = server_url() else { return };
    let db = TestDb::create(server).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.jsonl");
    let http = client();
    let a = Daemon::start(dir.path(), "a", &db, &outbox);
    let b = Daemon::start(dir.path(), "b", &db, &outbox);
    let (active, standby) = one_active(&http, &a, &b).await;
    let conn = db.connect().await;
    let epoch = scalar(&conn, "SELECT epoch FROM ha_lease").await;
    let ended = Instant::now();
    assert_eq!(
        scalar(
            &conn,
            "SELECT count(*) FROM (SELECT pg_terminate_backend(backend_pid::int) FROM ha_lease) t"
        )
        .await,
        1
    );
    until_role(&http, standby, "active", TARGET).await;
    until_role(&http, active, "standby", TARGET).await;
    println!(
        "takeover after the lock connection ended: {:?}",
        ended.elapsed()
    );
    assert!(scalar(&conn, "SELECT epoch FROM ha_lease").await > epoch);
    assert!(active.logs().contains("steps down"), "{}", active.logs());
    assert_eq!(
        put_practice(&http, standby, "p").await.unwrap().status(),
        200
    );
    conn.close().await.unwrap();
    drop((a, b));
    db.drop().await;
}

/// What the load got acknowledged (2xx), by kind: the markers it sent.
#[derive(Default)]
struct Acked {
    staff: Vec<String>,
    portal: Vec<String>,
    inbound: Vec<String>,
    starts: Vec<String>,
    refused: u64,
}

/// Sends one request to whichever daemon serves (tries each base in turn); whether
/// one answered 2xx.
async fn send_any(
    bases: &std::sync::Mutex<Vec<String>>,
    request: impl Fn(&str) -> reqwest::RequestBuilder,
) -> bool {
    let bases = bases.lock().unwrap().clone();
    for base in bases {
        match request(&base).timeout(Duration::from_secs(5)).send().await {
            Ok(response) if response.status().is_success() => return true,
            Ok(response) => {
                let status = response.status();
                let body: Value = response.json().await.unwrap_or_default();
                // Error codes only: never a body the test sent.
                if body["error"]["code"] != "standby" {
                    eprintln!("refused: {status} {}", body["error"]["code"]);
                }
            }
            Err(_) => {}
        }
    }
    false
}

fn patient_phone(i: usize) -> String {
    format!("+1201555{:04}", 2000 + i)
}

/// Steady load through the API while the active daemon is SIGKILLed 20 times in a
/// row (alternating, since the killed one comes back as the standby): every 2xx is
/// stored exactly once, sequence numbers stay gapless, no text goes out twice, due
/// timers fire, and the standby serves within the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_rounds_under_load_lose_and_duplicate_nothing() {
    let Some(server) = server_url() else { return };
    if std::env::var("CAREMSG_FAULTS").as_deref() != Ok("1") {
        return;
    }
    const ROUNDS: usize = 20;
    const PATIENTS: usize = 60;
    let db = TestDb::create(server).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.jsonl");
    let http = client();
    let mut daemons = vec![
        Daemon::start(dir.path(), "d0", &db, &outbox),
        Daemon::start(dir.path(), "d1", &db, &outbox),
    ];
    let (active, _) = one_active(&http, &daemons[0], &daemons[1]).await;
    let base = active.base();
    assert_eq!(
        put_practice(&http, active, "p").await.unwrap().status(),
        200
    );
    let admin = |path: String, body: Value| {
        http.put(format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    let user = admin(
        "/v1/admin/users/u1".into(),
        json!({"practice_id": "p", "name": "User One", "email": "u1@clinic.example", "restricted_programs": []}),
    )
    .await
    .unwrap();
    assert_eq!(user.status(), 200);
    for i in 0..PATIENTS {
        let response = admin(
            format!("/v1/admin/patients/pat{i:02}"),
            json!({"practice_id": "p", "first_name": "Pat", "last_name": "Example",
                   "date_of_birth": "1950-04-07", "mobile_phone": patient_phone(i),
                   "portal_enrolled": true, "programs": [], "care_team": ["u1"]}),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }

    let bases = std::sync::Arc::new(std::sync::Mutex::new(
        daemons.iter().map(Daemon::base).collect::<Vec<_>>(),
    ));
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Acked::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let practice_number = number_of("p");
    let mut load = Vec::new();
    for kind in 0..4 {
        let (http, bases, acked, stop) = (http.clone(), bases.clone(), acked.clone(), stop.clone());
        let practice_number = practice_number.clone();
        load.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.is_cancelled() {
                n += 1;
                let patient = format!("pat{:02}", n % PATIENTS);
                let marker = format!("k{kind}-{n}");
                let ok = match kind {
                    0 => {
                        send_any(&bases, |b| {
                            http.post(format!("{b}/v1/staff/patients/{patient}/messages"))
                                .bearer_auth("dev-staff-token")
                                .header("x-caremsg-user", "u1")
                                .json(&json!({"body": marker}))
                        })
                        .await
                    }
                    1 => {
                        send_any(&bases, |b| {
                            http.post(format!("{b}/v1/portal/patients/{patient}/messages"))
                                .bearer_auth("dev-portal-token")
                                .json(&json!({"body": marker}))
                        })
                        .await
                    }
                    2 => {
                        send_any(&bases, |b| {
                            http.post(format!("{b}/v1/hooks/loopback")).json(&json!({
                            "from": patient_phone(n % PATIENTS), "to": practice_number,
                            "body": marker, "id": marker}))
                        })
                        .await
                    }
                    _ => {
                        // One SMS start per patient, never retried: a recipient gets at
                        // most one opt-in text.
                        if n > PATIENTS {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                        let patient = format!("pat{:02}", n - 1);
                        let ok = send_any(&bases, |b| {
                            http.post(format!("{b}/v1/staff/patients/{patient}/sms/start"))
                                .bearer_auth("dev-staff-token")
                                .header("x-caremsg-user", "u1")
                        })
                        .await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        ok
                    }
                };
                let mut acked = acked.lock().unwrap();
                match (ok, kind) {
                    (false, _) => acked.refused += 1,
                    (true, 0) => acked.staff.push(marker),
                    (true, 1) => acked.portal.push(marker),
                    (true, 2) => acked.inbound.push(marker),
                    (true, _) => acked.starts.push(format!("pat{:02}", n - 1)),
                }
            }
        }));
    }

    let mut takeovers = Vec::new();
    for round in 0..ROUNDS {
        let (active, _) = one_active(&http, &daemons[0], &daemons[1]).await;
        let (killed, survivor) = if active.port == daemons[0].port {
            (0, 1)
        } else {
            (1, 0)
        };
        daemons[killed].kill();
        let started = Instant::now();
        let took = until_role(&http, &daemons[survivor], "active", TARGET).await;
        takeovers.push(started.elapsed().max(took));
        let fresh = Daemon::start(dir.path(), &format!("r{round}"), &db, &outbox);
        *bases.lock().unwrap() = vec![daemons[survivor].base(), fresh.base()];
        daemons[killed] = fresh;
        until_role(&http, &daemons[killed], "standby", Duration::from_secs(60)).await;
    }
    stop.cancel();
    for task in load {
        task.await.unwrap();
    }
    one_active(&http, &daemons[0], &daemons[1]).await;

    // Let the outbox drain; every timer due by now has fired.
    let conn = db.connect().await;
    let started = Instant::now();
    while scalar(
        &conn,
        "SELECT count(*) FROM deliveries WHERE status IN ('queued', 'sending')",
    )
    .await
        > 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the outbox did not drain"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        scalar(
            &conn,
            "SELECT count(*) FROM timers WHERE NOT fired AND due_at < now() - interval '30 seconds'"
        )
        .await,
        0,
        "a due timer was not fired"
    );

    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let rows = |sql: &'static str| {
        let conn = &conn;
        async move {
            conn.query_all_raw(Statement::from_string(conn.get_database_backend(), sql))
                .await
                .unwrap()
        }
    };
    let mut stored = std::collections::HashMap::<String, i64>::new();
    for row in rows("SELECT body, count(*) AS n FROM messages GROUP BY body").await {
        stored.insert(
            row.try_get("", "body").unwrap(),
            row.try_get("", "n").unwrap(),
        );
    }
    let mut lost = 0;
    let mut duplicates = 0;
    // Inbound texts from numbers without SMS enabled may be stored as unmatched
    // rather than as conversation messages: their receipts are counted below.
    for marker in acked.staff.iter().chain(&acked.portal) {
        match stored.get(marker).copied().unwrap_or(0) {
            0 => lost += 1,
            1 => {}
            _ => duplicates += 1,
        }
    }
    let mut receipts = std::collections::HashMap::<String, i64>::new();
    for row in
        rows("SELECT provider_message_id AS id, count(*) AS n FROM inbound_receipts GROUP BY 1")
            .await
    {
        receipts.insert(
            row.try_get("", "id").unwrap(),
            row.try_get("", "n").unwrap(),
        );
    }
    for marker in &acked.inbound {
        match receipts.get(marker).copied().unwrap_or(0) {
            0 => lost += 1,
            1 => {}
            _ => duplicates += 1,
        }
    }
    let gaps = rows(
        "SELECT patient_id FROM messages GROUP BY patient_id HAVING count(*) <> max(seq) - min(seq) + 1",
    )
    .await
    .len();
    let mut sent = std::collections::HashMap::<(String, String), usize>::new();
    for line in std::fs::read_to_string(&outbox).unwrap_or_default().lines() {
        let line: Value = serde_json::from_str(line).unwrap();
        let key = (
            line["to"].as_str().unwrap_or("").to_owned(),
            line["body"].as_str().unwrap_or("").to_owned(),
        );
        *sent.entry(key).or_default() += 1;
    }
    let double_sends = sent.values().filter(|n| **n > 1).count();
    let sessions = scalar(
        &conn,
        "SELECT count(DISTINCT patient_id) FROM sms_auth_sessions",
    )
    .await;
    takeovers.sort();
    println!(
        "failover rounds: {ROUNDS}; acked: {} staff, {} portal, {} inbound, {} sms starts ({} requests refused); \
         lost: {lost}; duplicates: {duplicates}; gaps: {gaps}; double sends: {double_sends}; texts: {}; \
         takeover p50 {:?}, max {:?}",
        acked.staff.len(),
        acked.portal.len(),
        acked.inbound.len(),
        acked.starts.len(),
        acked.refused,
        sent.values().sum::<usize>(),
        takeovers[takeovers.len() / 2],
        takeovers[takeovers.len() - 1],
    );
    assert!(!acked.staff.is_empty() && !acked.portal.is_empty());
    assert_eq!((lost, duplicates, gaps, double_sends), (0, 0, 0, 0));
    assert!(
        sessions >= acked.starts.len() as i64,
        "an acknowledged SMS start was lost"
    );
    assert!(*takeovers.last().unwrap() < TARGET);
    conn.close().await.unwrap();
    drop(daemons);
    db.drop().await;
}
