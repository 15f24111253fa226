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
        .timeout(Duration::from_secs(10))
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
            "sms_numbers": [{"number": "+12015550100", "gateway": "loopback"}],
        }))
        .send()
        .await
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
                    "sms_numbers": [{"number": "+12015550101", "gateway": "loopback"}],
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
