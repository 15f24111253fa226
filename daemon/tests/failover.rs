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
use std::process::Command;

use caremsgd::bench::failover::ChildDaemon;
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

fn loopback_library() -> PathBuf {
    caremsg_testplugins::library_path(caremsg_testplugins::SMS_LOOPBACK).unwrap()
}

/// One `caremsgd run` process (the bench's [`ChildDaemon`]: the same configuration).
struct Daemon {
    inner: ChildDaemon,
    port: u16,
}

impl Daemon {
    /// Starts a daemon on `db` with its own state directory under `dir`, the shared
    /// loopback outbox `outbox`, and a short lease (renew 1 s, expiry 3 s).
    fn start(dir: &Path, name: &str, db: &TestDb, outbox: &Path) -> Self {
        Self::start_with(dir, name, db, outbox, &[])
    }

    /// [`Daemon::start`] with further `CAREMSG__…` overrides.
    fn start_with(
        dir: &Path,
        name: &str,
        db: &TestDb,
        outbox: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let inner = ChildDaemon::spawn(
            Path::new(BIN),
            &dir.join(name),
            &db.url(),
            &loopback_library(),
            outbox,
            Some((Duration::from_secs(1), Duration::from_secs(3))),
            "info",
            env,
        )
        .unwrap();
        let port = inner.port();
        Self { inner, port }
    }

    fn base(&self) -> String {
        self.inner.base()
    }

    fn pid(&self) -> String {
        self.inner.pid().to_string()
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
        self.inner.kill();
    }

    /// SIGTERM, and wait for a clean exit.
    fn stop(&mut self) {
        self.signal("-TERM");
        let status = self.inner.child_mut().wait().unwrap();
        assert!(
            status.success(),
            "exit after SIGTERM: {status:?}\n{}",
            self.logs()
        );
    }

    fn logs(&self) -> String {
        self.inner.logs()
    }

    /// `/readyz`: Some("active"/"standby") when the daemon answers.
    async fn role(&self, http: &reqwest::Client) -> Option<String> {
        self.inner.role(http).await
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

/// Request kinds of the load that carry a marker (in `messages.body`).
const KINDS: [&str; 4] = ["staff", "portal", "inbound", "sms start"];

/// What the load got acknowledged (2xx), by kind: the markers it sent.
#[derive(Default)]
struct Acked {
    /// Markers of acknowledged staff sends, portal sends and inbound texts (by
    /// `KINDS` index).
    markers: [Vec<String>; 3],
    /// Patients whose acknowledged SMS start came back.
    starts: Vec<String>,
    /// Tries no daemon acknowledged, by (kind, why the last one failed); retried.
    refused: std::collections::BTreeMap<(&'static str, String), u64>,
}

/// Sends one request to whichever daemon serves (tries each base in turn): Ok when
/// one answered 2xx, else why the last one did not (a status and error code, or the
/// transport error's kind; never a body the test sent).
async fn send_any(
    bases: &std::sync::Mutex<Vec<String>>,
    request: impl Fn(&str) -> reqwest::RequestBuilder,
) -> Result<(), String> {
    let bases = bases.lock().unwrap().clone();
    let mut why = String::from("no daemon");
    for base in bases {
        let started = Instant::now();
        match request(&base).timeout(Duration::from_secs(5)).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => {
                let status = response.status();
                let body: Value = response.json().await.unwrap_or_default();
                why = format!("{} {}", status.as_u16(), body["error"]["code"]);
            }
            Err(err) if err.is_timeout() => {
                why = format!("timeout after {:?}", started.elapsed());
            }
            Err(err) if err.is_connect() => why = "connect".into(),
            Err(_) => why = "transport".into(),
        }
    }
    Err(why)
}

fn patient_phone(i: usize) -> String {
    format!("+1201555{:04}", 2000 + i)
}

/// Polls `count` until it reaches `at_least`; panics after `within`.
async fn until_count(what: &str, within: Duration, at_least: usize, count: impl Fn() -> usize) {
    let started = Instant::now();
    while count() < at_least {
        assert!(
            started.elapsed() < within,
            "{what}: {} of {at_least} within {within:?}",
            count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Steady load through the API while the active daemon is SIGKILLed 20 times in a
/// row (alternating, since the killed one comes back as the standby): portal and
/// staff sends and inbound texts from SMS-enabled patients, each retried with its
/// idempotency key (`client_txn_id`, the provider's message id) until a daemon
/// acknowledges it, as clients and providers do, and SMS starts. Every term of an
/// active daemon carries acknowledged requests of every kind. Then: every 2xx is
/// stored exactly once, sequence numbers stay gapless, no text goes out twice, every
/// due timer (unread reminders, due after 1 s) fired exactly once — each fired
/// reminder has exactly one notification, and none is left due — and the standby
/// serves within the target.
///
/// Before, the load dropped a request at its first refusal and tried the next one at
/// once: during each takeover every kind spun through hundreds of 503 `standby`
/// answers, so most inbound texts (like every kind) were refused rather than
/// acknowledged; and the texts came from patients who were not SMS-enabled, so they
/// went to the unmatched log (and spoiled the pending SMS starts as wrong
/// date-of-birth replies) instead of conversations.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_rounds_under_load_lose_and_duplicate_nothing() {
    let Some(server) = server_url() else { return };
    if std::env::var("CAREMSG_FAULTS").as_deref() != Ok("1") {
        return;
    }
    const ROUNDS: usize = 20;
    /// Patients; the even ones are SMS-enabled before the rounds and text, the odd
    /// ones get their SMS start during the rounds.
    const PATIENTS: usize = 60;
    /// Acknowledged requests of each kind each active daemon serves before its kill.
    const PER_TERM: usize = 3;
    let db = TestDb::create(server).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.jsonl");
    let http = client();
    // Unread reminders come due during the rounds.
    let env = [("CAREMSG__NOTIFICATIONS__UNREAD_REMINDER_AFTER", "1s")];
    let mut daemons = vec![
        Daemon::start_with(dir.path(), "d0", &db, &outbox, &env),
        Daemon::start_with(dir.path(), "d1", &db, &outbox, &env),
    ];
    let (active, _) = one_active(&http, &daemons[0], &daemons[1]).await;
    let base = active.base();
    assert_eq!(
        put_practice(&http, active, "p").await.unwrap().status(),
        200
    );
    let practice_number = number_of("p");
    let admin = |path: String, body: Value| {
        http.put(format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    // u1: on every care team, New Patient Message and the Unread Reminder on; never
    // opens a conversation, so each patient's first unread message arms a reminder.
    // u2: sends the staff messages.
    for user in ["u1", "u2"] {
        let response = admin(
            format!("/v1/admin/users/{user}"),
            json!({"practice_id": "p", "name": "User", "email": format!("{user}@clinic.example"), "restricted_programs": []}),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
    }
    let settings = http
        .put(format!("{base}/v1/staff/settings/notifications"))
        .bearer_auth("dev-staff-token")
        .header("x-caremsg-user", "u1")
        .json(&json!({"new_patient_message": true, "unread_reminder": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(settings.status(), 200, "{}", settings.text().await.unwrap());
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
    // The even patients SMS-enabled through the real flow: the 'Text Messages'
    // button, then the date-of-birth reply through the loopback hook.
    for i in (0..PATIENTS).step_by(2) {
        let started = http
            .post(format!("{base}/v1/staff/patients/pat{i:02}/sms/start"))
            .bearer_auth("dev-staff-token")
            .header("x-caremsg-user", "u2")
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), 200, "{}", started.text().await.unwrap());
        let reply = http
            .post(format!("{base}/v1/hooks/loopback"))
            .json(&json!({"from": patient_phone(i), "to": practice_number,
                          "body": "04/07/1950", "id": format!("dob-{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
    }
    let conn = db.connect().await;
    assert_eq!(
        scalar(
            &conn,
            "SELECT count(*) FROM patients WHERE sms_status = 'enabled'"
        )
        .await,
        (PATIENTS / 2) as i64
    );

    let bases = std::sync::Arc::new(std::sync::Mutex::new(
        daemons.iter().map(Daemon::base).collect::<Vec<_>>(),
    ));
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Acked::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for (kind, name) in KINDS.into_iter().enumerate() {
        let (http, bases, acked, stop) = (http.clone(), bases.clone(), acked.clone(), stop.clone());
        let practice_number = practice_number.clone();
        load.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.is_cancelled() {
                n += 1;
                let marker = format!("k{kind}-{n}");
                if kind == 3 {
                    // One SMS start per odd patient, never retried: a recipient gets
                    // at most one opt-in text.
                    if 2 * n > PATIENTS {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    let patient = format!("pat{:02}", 2 * n - 1);
                    let ok = send_any(&bases, |b| {
                        http.post(format!("{b}/v1/staff/patients/{patient}/sms/start"))
                            .bearer_auth("dev-staff-token")
                            .header("x-caremsg-user", "u2")
                    })
                    .await;
                    {
                        let mut acked = acked.lock().unwrap();
                        match ok {
                            Ok(()) => acked.starts.push(patient),
                            Err(why) => *acked.refused.entry((name, why)).or_default() += 1,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                // The same request (same idempotency key) until acknowledged.
                while !stop.is_cancelled() {
                    let ok = match kind {
                        0 => {
                            let patient = format!("pat{:02}", n % PATIENTS);
                            send_any(&bases, |b| {
                                http.post(format!("{b}/v1/staff/patients/{patient}/messages"))
                                    .bearer_auth("dev-staff-token")
                                    .header("x-caremsg-user", "u2")
                                    .json(&json!({"body": marker, "client_txn_id": marker}))
                            })
                            .await
                        }
                        1 => {
                            let patient = format!("pat{:02}", n % PATIENTS);
                            send_any(&bases, |b| {
                                http.post(format!("{b}/v1/portal/patients/{patient}/messages"))
                                    .bearer_auth("dev-portal-token")
                                    .json(&json!({"body": marker, "client_txn_id": marker}))
                            })
                            .await
                        }
                        _ => {
                            // From an SMS-enabled (even) patient: into the conversation.
                            let from = patient_phone((2 * n) % PATIENTS);
                            send_any(&bases, |b| {
                                http.post(format!("{b}/v1/hooks/loopback")).json(&json!({
                                    "from": from, "to": practice_number,
                                    "body": marker, "id": marker}))
                            })
                            .await
                        }
                    };
                    {
                        let mut acked = acked.lock().unwrap();
                        match ok {
                            Ok(()) => {
                                acked.markers[kind].push(marker.clone());
                                break;
                            }
                            Err(why) => *acked.refused.entry((name, why)).or_default() += 1,
                        }
                    }
                    // No daemon serves now (a takeover): retry shortly, as a client
                    // honouring Retry-After or a provider would.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let acked_of = |kind: usize| acked.lock().unwrap().markers[kind].len();

    let mut takeovers = Vec::new();
    for round in 0..ROUNDS {
        let (active, _) = one_active(&http, &daemons[0], &daemons[1]).await;
        // This term carries load: acknowledged requests of every kind.
        for (kind, name) in KINDS.into_iter().enumerate().take(3) {
            let so_far = acked_of(kind);
            until_count(
                &format!("round {round}: {name} acknowledged"),
                Duration::from_secs(60),
                so_far + PER_TERM,
                || acked_of(kind),
            )
            .await;
        }
        let (killed, survivor) = if active.port == daemons[0].port {
            (0, 1)
        } else {
            (1, 0)
        };
        daemons[killed].kill();
        let started = Instant::now();
        let took = until_role(&http, &daemons[survivor], "active", TARGET).await;
        takeovers.push(started.elapsed().max(took));
        let fresh = Daemon::start_with(dir.path(), &format!("r{round}"), &db, &outbox, &env);
        *bases.lock().unwrap() = vec![daemons[survivor].base(), fresh.base()];
        daemons[killed] = fresh;
        until_role(&http, &daemons[killed], "standby", Duration::from_secs(60)).await;
    }
    stop.cancel();
    for task in load {
        task.await.unwrap();
    }
    one_active(&http, &daemons[0], &daemons[1]).await;

    // Let the outbox drain and every due timer fire.
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
    let started = Instant::now();
    while scalar(
        &conn,
        "SELECT count(*) FROM timers WHERE NOT fired AND due_at < now()",
    )
    .await
        > 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a due timer was not fired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let rows = |sql: &'static str| {
        let conn = &conn;
        async move {
            conn.query_all_raw(Statement::from_string(conn.get_database_backend(), sql))
                .await
                .unwrap()
        }
    };
    let counts = |rows: Vec<sea_orm::QueryResult>| {
        rows.into_iter()
            .map(|row| {
                (
                    row.try_get::<String>("", "k").unwrap(),
                    row.try_get::<i64>("", "n").unwrap(),
                )
            })
            .collect::<std::collections::HashMap<_, _>>()
    };
    let stored = counts(rows("SELECT body AS k, count(*) AS n FROM messages GROUP BY body").await);
    let receipts = counts(
        rows("SELECT provider_message_id AS k, count(*) AS n FROM inbound_receipts GROUP BY 1")
            .await,
    );
    let mut lost = 0;
    let mut duplicates = 0;
    // Every acknowledged send and text is a conversation message, once; every text
    // also has its receipt, once.
    let every = acked.markers.iter().flatten().map(|m| stored.get(m));
    let texts = acked.markers[2].iter().map(|m| receipts.get(m));
    for count in every.chain(texts) {
        match count.copied().unwrap_or(0) {
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

    // Timers, by their effects: every fired reminder made exactly one notification
    // (its subject is the timer's), and no notification came without a fired timer.
    let fired = counts(
        rows(
            "SELECT subject AS k, count(*) AS n FROM timers \
             WHERE kind = 'unread_reminder' AND fired AND NOT dead GROUP BY subject",
        )
        .await,
    );
    let reminded = counts(
        rows(
            "SELECT subject AS k, count(*) AS n FROM notifications \
             WHERE kind = 'unread_reminder' GROUP BY subject",
        )
        .await,
    );
    let dead = scalar(&conn, "SELECT count(*) FROM timers WHERE dead").await;
    let unfired_reminders = fired.keys().filter(|s| !reminded.contains_key(*s)).count();
    let reminders_twice = reminded.values().filter(|n| **n > 1).count();
    let reminders_without_timer = reminded.keys().filter(|s| !fired.contains_key(*s)).count();

    takeovers.sort();
    println!(
        "failover rounds: {ROUNDS}; acked: {} staff, {} portal, {} inbound, {} sms starts ({} tries refused and retried); \
         lost: {lost}; duplicates: {duplicates}; gaps: {gaps}; double sends: {double_sends}; texts: {}; \
         reminders fired: {} (without a notification {unfired_reminders}, notified twice {reminders_twice}, \
         notified without a fired timer {reminders_without_timer}, dead timers {dead}); \
         takeover p50 {:?}, max {:?}",
        acked.markers[0].len(),
        acked.markers[1].len(),
        acked.markers[2].len(),
        acked.starts.len(),
        acked.refused.values().sum::<u64>(),
        sent.values().sum::<usize>(),
        fired.len(),
        takeovers[takeovers.len() / 2],
        takeovers[takeovers.len() - 1],
    );
    for ((kind, why), n) in &acked.refused {
        println!("  refused: {kind}: {why}: {n}");
    }
    for (markers, name) in acked.markers.iter().zip(KINDS) {
        assert!(
            markers.len() >= ROUNDS * PER_TERM,
            "{name}: {}",
            markers.len()
        );
    }
    assert_eq!((lost, duplicates, gaps, double_sends), (0, 0, 0, 0));
    assert!(
        sessions >= (PATIENTS / 2 + acked.starts.len()) as i64,
        "an acknowledged SMS start was lost"
    );
    assert!(!fired.is_empty(), "no unread reminder came due");
    assert_eq!(
        (
            unfired_reminders,
            reminders_twice,
            reminders_without_timer,
            dead
        ),
        (0, 0, 0, 0),
        "a due timer did not fire exactly once"
    );
    assert!(*takeovers.last().unwrap() < TARGET);
    conn.close().await.unwrap();
    drop(daemons);
    db.drop().await;
}

/// `caremsgd bench failover` with tiny sizes: it runs, kills, and finds every
/// acknowledged message stored exactly once (its times and rates are the benchmark's
/// business, not asserted here).
#[test]
fn bench_failover_runs_with_tiny_sizes() {
    let Some(server) = server_url() else { return };
    let output = Command::new(BIN)
        .args(["bench", "failover", "--postgres", &server])
        .args([
            "--kills",
            "2",
            "--seconds",
            "1",
            "--clients",
            "4",
            "--patients",
            "10",
        ])
        .arg("--library")
        .arg(loopback_library())
        .env("CAREMSG__LOG__LEVEL", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("rounds ") && l.trim_end().ends_with(" 2")),
        "{stdout}"
    );
    for line in [
        "takeover p50 / max",
        "msgs/s before",
        "msgs/s after takeover",
        "after / before",
        "every acknowledged message stored exactly once: met",
    ] {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
}
