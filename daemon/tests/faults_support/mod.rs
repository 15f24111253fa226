//! The fault-injection suite's harness (`faults.rs`): the real `caremsgd` binary as
//! a child process on a fixed loopback port, its database (a SQLite file, or a fresh
//! PostgreSQL database when `DATABASE_URL` names a server), an HTTP client that
//! tells an answer from a request that never arrived and from one whose outcome is
//! unknown, a ledger of every write and its answer, and the read-back checks: every
//! acknowledged write stored exactly once, sequences gapless, no text sent twice.

#![allow(dead_code, reason = "each test uses a part of the harness")]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use caremsg_entities::{conversation, inbound_receipt, message, unmatched_inbound};
use reqwest::Method;
use sea_orm::{
    ColumnTrait, ConnectionTrait, Database, DatabaseConnection, EntityTrait, QueryFilter,
    QuerySelect,
};
use serde_json::{Value, json};

/// The daemon binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_caremsgd");
/// The development tokens of the embedded default configuration.
pub const ADMIN: &str = "dev-admin-token";
/// Staff application token.
pub const STAFF: &str = "dev-staff-token";
/// Portal backend token.
pub const PORTAL: &str = "dev-portal-token";
/// The date of birth every test patient has, and the reply that confirms it.
pub const DOB: &str = "1950-04-07";
/// The reply that confirms [`DOB`].
pub const DOB_REPLY: &str = "04/07/1950";

/// True when `CAREMSG_FAULTS=1`; otherwise says that `test` is skipped.
pub fn enabled(test: &str) -> bool {
    if std::env::var("CAREMSG_FAULTS").as_deref() == Ok("1") {
        true
    } else {
        println!("{test}: skipped (the fault-injection suite runs with CAREMSG_FAULTS=1)");
        false
    }
}

/// A count scaled by an environment variable (`default` when unset or unreadable).
pub fn scaled(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The tests of this binary run one at a time: each owns both cores while it injects
/// its faults, and the disk-full test mounts a file system.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the daemon's data lives.
#[derive(Debug, Clone)]
pub enum Store {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A database made on the PostgreSQL server for this test: (server URL, name).
    Postgres(String, String),
}

impl Store {
    /// PostgreSQL when `DATABASE_URL` names a server, else `<dir>/caremsg.db`.
    pub async fn create(dir: &Path) -> Self {
        match std::env::var("DATABASE_URL") {
            Ok(server) if server.starts_with("postgres") => {
                let name = format!("caremsg_f_{}", uuid::Uuid::new_v4().simple());
                let admin = Database::connect(&server).await.unwrap();
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
                admin.close().await.unwrap();
                Self::Postgres(server, name)
            }
            _ => Self::Sqlite(dir.join("caremsg.db")),
        }
    }

    /// The SQLite file, or `None` on PostgreSQL.
    pub fn sqlite_file(&self) -> Option<&Path> {
        match self {
            Self::Sqlite(path) => Some(path),
            Self::Postgres(..) => None,
        }
    }

    /// The PostgreSQL database's name.
    pub fn postgres_name(&self) -> Option<&str> {
        match self {
            Self::Sqlite(_) => None,
            Self::Postgres(_, name) => Some(name),
        }
    }

    /// The URL the daemon (and the checks) connect with.
    pub fn url(&self) -> String {
        match self {
            Self::Sqlite(path) => format!("sqlite://{}?mode=rwc", path.display()),
            Self::Postgres(server, name) => {
                let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
                format!("{base}/{name}")
            }
        }
    }

    /// A connection of the test's own, for read-back.
    pub async fn connect(&self) -> DatabaseConnection {
        Database::connect(self.url()).await.unwrap()
    }

    /// Drops a PostgreSQL database (a SQLite file goes with its folder).
    pub async fn drop_database(&self) {
        if let Self::Postgres(server, name) = self
            && let Ok(admin) = Database::connect(server).await
        {
            let _ = admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
            let _ = admin.close().await;
        }
    }
}

/// A free loopback port (the daemon is restarted on the same one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The configuration text: the embedded default with this test's state folder,
/// port, loopback library and outbox, and `extra` appended (whole sections).
pub fn config_text(state_dir: &Path, port: u16, extra: &str) -> String {
    let library = caremsg_testplugins::library_path(caremsg_testplugins::SMS_LOOPBACK).unwrap();
    let text = caremsg_config::EMBEDDED_DEFAULT
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = {:?}", state_dir.display().to_string()),
        )
        .replace("127.0.0.1:8680", &format!("127.0.0.1:{port}"))
        .replace(
            "\"target/debug/deps/libcaremsg_sms_loopback.so\"",
            &format!("{:?}", library.display().to_string()),
        )
        .replace(
            "\"state/loopback-outbox.jsonl\"",
            &format!(
                "{:?}",
                state_dir
                    .join("loopback-outbox.jsonl")
                    .display()
                    .to_string()
            ),
        );
    format!("{text}\n{extra}\n")
}

/// How to start a daemon (again).
#[derive(Debug, Clone)]
pub struct Launch {
    /// The config file.
    pub config: PathBuf,
    /// The port in it.
    pub port: u16,
    /// Environment of the child (the database URL, overrides).
    pub env: Vec<(String, String)>,
}

impl Launch {
    /// Writes the config for `store` in `state_dir` and returns how to start it.
    pub fn new(store: &Store, state_dir: &Path, config_dir: &Path, extra: &str) -> Self {
        let port = free_port();
        let config = config_dir.join("caremsg.toml");
        std::fs::write(&config, config_text(state_dir, port, extra)).unwrap();
        Self {
            config,
            port,
            env: vec![("CAREMSG__DATABASE__URL".to_owned(), store.url())],
        }
    }

    /// Adds an environment override.
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// The last lines the daemon logged (bounded), for failure messages.
type LogTail = Arc<Mutex<std::collections::VecDeque<String>>>;

/// The daemon as a child process; killed when dropped.
pub struct Daemon {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The last 200 log lines.
    logs: LogTail,
    /// Lines logged in total that contained one of the watched phrases.
    watched: Arc<Mutex<BTreeMap<&'static str, u64>>>,
}

/// Log phrases counted for the figures.
const WATCHED: [&str; 3] = ["ERROR", "panicked", "storage"];

impl Daemon {
    /// Starts the daemon and waits until `/healthz` answers (60 s at most).
    pub async fn start(launch: &Launch, notify_socket: Option<&Path>) -> Self {
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(&launch.config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in &launch.env {
            command.env(key, value);
        }
        if let Some(socket) = notify_socket {
            command.env("NOTIFY_SOCKET", socket);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs: LogTail = Arc::default();
        let watched: Arc<Mutex<BTreeMap<&'static str, u64>>> = Arc::default();
        {
            let logs = logs.clone();
            let watched = watched.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    for phrase in WATCHED {
                        if line.contains(phrase) {
                            *lock(&watched).entry(phrase).or_default() += 1;
                        }
                    }
                    let mut tail = lock(&logs);
                    if tail.len() == 200 {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            });
        }
        let mut daemon = Self {
            child,
            base: format!("http://127.0.0.1:{}", launch.port),
            logs,
            watched,
        };
        daemon.wait_healthy().await;
        daemon
    }

    /// Polls `/healthz` until it answers 200; panics with the log if the daemon exits.
    async fn wait_healthy(&mut self) {
        let http = client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the daemon exited ({status}) while starting:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(r) = http.get(format!("{}/healthz", self.base)).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not answer /healthz within 60 s:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client for this incarnation (no pooled connection survives a kill).
    pub fn api(&self) -> Api {
        Api {
            http: client(),
            base: self.base.clone(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`-HUP`, `-TERM`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {name}");
    }

    /// SIGKILL, and reaps the process.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; waits (60 s at most) for the exit and returns whether it was clean.
    pub fn stop(mut self) -> bool {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the log.
    pub fn log_tail(&self) -> String {
        lock(&self.logs)
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// How many log lines contained `phrase` (one of [`WATCHED`]).
    pub fn logged(&self, phrase: &str) -> u64 {
        lock(&self.watched).get(phrase).copied().unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// One HTTP request, kept so that it can be sent again unchanged.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub token: Option<&'static str>,
    pub user: Option<String>,
    pub body: Option<Value>,
}

impl Request {
    /// An admin request.
    pub fn admin(method: Method, path: String, body: Value) -> Self {
        Self {
            method,
            path,
            token: Some(ADMIN),
            user: None,
            body: Some(body),
        }
    }

    /// A staff request as `user`.
    pub fn staff(method: Method, path: String, user: &str, body: Option<Value>) -> Self {
        Self {
            method,
            path,
            token: Some(STAFF),
            user: Some(user.to_owned()),
            body,
        }
    }

    /// A portal message to `patient`; its `client_txn_id` is the body's head (the
    /// tests' bodies are unique within their first 40 characters).
    pub fn portal_send(patient: &str, body: &str) -> Self {
        Self {
            method: Method::POST,
            path: format!("/v1/portal/patients/{patient}/messages"),
            token: Some(PORTAL),
            user: None,
            body: Some(json!({"body": body, "client_txn_id": txn_id(body)})),
        }
    }

    /// A staff message to `patient`, with the body's head as its `client_txn_id`.
    pub fn staff_send(patient: &str, user: &str, body: &str) -> Self {
        Self::staff(
            Method::POST,
            format!("/v1/staff/patients/{patient}/messages"),
            user,
            Some(json!({"body": body, "client_txn_id": txn_id(body)})),
        )
    }

    /// A text from `from` to `to` through the loopback gateway's webhook.
    pub fn inbound(from: &str, to: &str, body: &str, id: &str) -> Self {
        Self {
            method: Method::POST,
            path: "/v1/hooks/loopback".to_owned(),
            token: None,
            user: None,
            body: Some(json!({"from": from, "to": to, "body": body, "id": id})),
        }
    }
}

/// The `client_txn_id` of a test message: its first 40 characters.
fn txn_id(body: &str) -> String {
    body.chars().take(40).collect()
}

/// What became of a request.
#[derive(Debug, Clone)]
pub enum Answer {
    /// The daemon answered.
    Status(u16, Value),
    /// The connection was refused: the request never reached the daemon.
    NotSent,
    /// The request may have reached the daemon; no answer came.
    Unknown(String),
}

impl Answer {
    /// A 2xx answer.
    pub fn ok(&self) -> bool {
        matches!(self, Self::Status(s, _) if (200..300).contains(s))
    }

    /// The status, if any.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status(s, _) => Some(*s),
            _ => None,
        }
    }

    /// The JSON body of an answer (`Null` otherwise).
    pub fn json(&self) -> &Value {
        match self {
            Self::Status(_, v) => v,
            _ => &Value::Null,
        }
    }
}

/// An HTTP client of one daemon incarnation.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
}

impl Api {
    /// Sends `request`.
    pub async fn call(&self, request: &Request) -> Answer {
        let mut builder = self.http.request(
            request.method.clone(),
            format!("{}{}", self.base, request.path),
        );
        if let Some(token) = request.token {
            builder = builder.bearer_auth(token);
        }
        if let Some(user) = &request.user {
            builder = builder.header("X-Caremsg-User", user);
        }
        if let Some(body) = &request.body {
            builder = builder.json(body);
        }
        match builder.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                match response.text().await {
                    Ok(text) => Answer::Status(
                        status,
                        serde_json::from_str(&text).unwrap_or(Value::String(text)),
                    ),
                    Err(e) => Answer::Unknown(format!("reading the body: {e}")),
                }
            }
            Err(e) if e.is_connect() => Answer::NotSent,
            Err(e) => Answer::Unknown(e.to_string()),
        }
    }

    /// Sends `request` and requires a 2xx answer; returns its JSON.
    pub async fn must(&self, request: &Request) -> Value {
        match self.call(request).await {
            Answer::Status(s, v) if (200..300).contains(&s) => v,
            other => panic!("{} {} answered {other:?}", request.method, request.path),
        }
    }

    /// A GET with `token` (and a staff user), requiring 2xx.
    pub async fn get(&self, path: &str, token: &'static str, user: Option<&str>) -> Value {
        self.must(&Request {
            method: Method::GET,
            path: path.to_owned(),
            token: Some(token),
            user: user.map(str::to_owned),
            body: None,
        })
        .await
    }

    /// `/readyz`'s status code.
    pub async fn readyz(&self) -> Option<u16> {
        self.http
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// Creates practice `id` (SMS and portal on) with the sending number `number`.
    pub async fn practice(&self, id: &str, number: &str) {
        self.must(&Request::admin(
            Method::PUT,
            format!("/v1/admin/practices/{id}"),
            json!({"name": format!("Clinic {id}"), "sms_enabled": true, "portal_enabled": true,
                "country": "US", "timezone": "America/New_York",
                "sms_numbers": [{"number": number, "gateway": "loopback"}]}),
        ))
        .await;
    }

    /// Creates staff user `id` of `practice`.
    pub async fn user(&self, practice: &str, id: &str) {
        self.must(&Request::admin(
            Method::PUT,
            format!("/v1/admin/users/{id}"),
            json!({"practice_id": practice, "name": format!("User {id}"), "restricted_programs": []}),
        ))
        .await;
    }

    /// Creates patient `id` of `practice` with `user` on its care team.
    pub async fn patient(
        &self,
        practice: &str,
        id: &str,
        user: &str,
        phone: Option<&str>,
        portal: bool,
    ) {
        let mut body = json!({"practice_id": practice, "first_name": "Pat", "last_name": "Fault",
            "date_of_birth": DOB, "portal_enrolled": portal, "programs": [], "care_team": [user]});
        if let Some(phone) = phone {
            body["mobile_phone"] = json!(phone);
        }
        self.must(&Request::admin(
            Method::PUT,
            format!("/v1/admin/patients/{id}"),
            body,
        ))
        .await;
    }

    /// SMS-enables `patient` (start, then the date-of-birth reply from `phone`).
    pub async fn enable_sms(&self, patient: &str, user: &str, phone: &str, practice_number: &str) {
        self.must(&sms_start(patient, user)).await;
        self.must(&Request::inbound(
            phone,
            practice_number,
            DOB_REPLY,
            &format!("enable-{patient}"),
        ))
        .await;
        assert_eq!(self.sms_status(patient, user).await, "enabled");
    }

    /// The SMS status of `patient`.
    pub async fn sms_status(&self, patient: &str, user: &str) -> String {
        self.get(
            &format!("/v1/staff/patients/{patient}/sms"),
            STAFF,
            Some(user),
        )
        .await["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// The 'Text Messages' button for `patient`.
pub fn sms_start(patient: &str, user: &str) -> Request {
    Request::staff(
        Method::POST,
        format!("/v1/staff/patients/{patient}/sms/start"),
        user,
        None,
    )
}

/// The `k`-th fictional mobile number (555-01xx in a set of US area codes).
pub fn phone(k: usize) -> String {
    const AREAS: [u16; 12] = [202, 203, 205, 206, 207, 208, 209, 210, 212, 213, 214, 215];
    format!(
        "+1{}555{:04}",
        AREAS[(k / 100) % AREAS.len()],
        100 + k % 100
    )
}

/// A practice's sending number (555-01xx in area 201).
pub fn practice_number(k: usize) -> String {
    format!("+1201555{:04}", 100 + k % 100)
}

/// What a ledger entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A portal message (body unique; `client_txn_id` = body).
    Portal,
    /// A staff message (body unique; `client_txn_id` = body).
    Staff,
    /// An inbound text stored in a conversation (provider id unique).
    Inbound,
    /// An inbound text from a number that is no patient's (unmatched log).
    Unmatched,
    /// An SMS start (no retry: not idempotent by design).
    SmsStart,
    /// A date-of-birth reply (provider id).
    DobReply,
}

/// One write sent during a fault, and what was answered.
#[derive(Debug, Clone)]
pub struct Op {
    pub kind: Kind,
    /// The conversation it belongs to.
    pub patient: String,
    /// Its identity: the body of a send, the provider id of a text.
    pub key: String,
    pub request: Request,
    pub answer: Answer,
    /// The answer of the retry after the fault, if one was sent.
    pub retried: Option<Answer>,
}

impl Op {
    /// Acknowledged: the first answer or the retry was 2xx.
    pub fn acked(&self) -> bool {
        self.answer.ok() || self.retried.as_ref().is_some_and(Answer::ok)
    }

    /// Whether it is retried with the same identity after a fault.
    pub fn retryable(&self) -> bool {
        self.kind != Kind::SmsStart
    }

    /// Whether the request may have reached the daemon.
    pub fn maybe_arrived(&self) -> bool {
        !matches!(self.answer, Answer::NotSent) || self.retried.is_some()
    }
}

/// Every write of a test and its answer.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    inner: Arc<Mutex<Vec<Op>>>,
}

impl Ledger {
    /// Records `op`.
    pub fn push(&self, op: Op) {
        lock(&self.inner).push(op);
    }

    /// A copy of every entry.
    pub fn all(&self) -> Vec<Op> {
        lock(&self.inner).clone()
    }

    /// Sends every retryable entry from `from` on that was not answered 2xx again,
    /// with the same identity, until it is (`attempts` tries); counts what needed it.
    pub async fn retry_unanswered(&self, api: &Api, from: usize, attempts: usize) -> Retries {
        let pending: Vec<(usize, Request)> = lock(&self.inner)
            .iter()
            .enumerate()
            .skip(from)
            .filter(|(_, op)| op.retryable() && !op.acked())
            .map(|(i, op)| (i, op.request.clone()))
            .collect();
        let mut retries = Retries::default();
        for (i, request) in pending {
            let mut answer = api.call(&request).await;
            let mut tries = 1;
            while !answer.ok() && tries < attempts {
                if answer.status() == Some(503) {
                    retries.unavailable += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                answer = api.call(&request).await;
                tries += 1;
            }
            retries.sent += 1;
            if !answer.ok() {
                retries
                    .failed
                    .push(format!("{} {}: {answer:?}", request.method, request.path));
            }
            lock(&self.inner)[i].retried = Some(answer);
        }
        retries
    }
}

/// What retrying after a fault took.
#[derive(Debug, Default)]
pub struct Retries {
    /// Requests sent again.
    pub sent: usize,
    /// 503 answers on the way.
    pub unavailable: usize,
    /// Requests still not answered 2xx (a failure).
    pub failed: Vec<String>,
}

/// What the database holds for the ledger, read back.
#[derive(Debug, Default)]
pub struct Readback {
    /// Messages checked.
    pub stored: usize,
    /// Acknowledged writes not found.
    pub lost: Vec<String>,
    /// Writes found more than once.
    pub duplicates: Vec<String>,
    /// Writes refused by a connection error (never arrived) yet stored.
    pub phantoms: Vec<String>,
    /// Acknowledged sends whose stored sequence differs from the answer.
    pub wrong_seq: Vec<String>,
    /// Conversations whose sequence has a gap or disagrees with `last_seq`.
    pub gaps: Vec<String>,
    /// Writes answered with an error (not yet retried) that are stored nevertheless:
    /// honest only where the error said the outcome is unknown.
    pub stored_after_error: Vec<String>,
}

impl Readback {
    /// Panics, naming what is wrong, unless nothing was lost, duplicated or invented.
    pub fn assert_clean(&self, when: &str) {
        assert!(
            self.lost.is_empty()
                && self.duplicates.is_empty()
                && self.phantoms.is_empty()
                && self.wrong_seq.is_empty()
                && self.gaps.is_empty(),
            "{when}: lost {:?}; duplicated {:?}; stored though never sent {:?}; \
             wrong seq {:?}; gaps {:?}",
            first(&self.lost),
            first(&self.duplicates),
            first(&self.phantoms),
            first(&self.wrong_seq),
            first(&self.gaps),
        );
    }
}

fn first(items: &[String]) -> String {
    let shown: Vec<_> = items.iter().take(5).cloned().collect();
    format!("{} in all, e.g. {shown:?}", items.len())
}

/// Reads back every entry of `ops` from the database: sends by body, texts by
/// provider id; every conversation among `patients` gapless from 1 to `last_seq`.
pub async fn read_back(db: &DatabaseConnection, ops: &[Op], patients: &[String]) -> Readback {
    let rows: Vec<(String, i64, String, Option<String>)> = message::Entity::find()
        .select_only()
        .column(message::Column::PatientId)
        .column(message::Column::Seq)
        .column(message::Column::Body)
        .column(message::Column::ProviderMessageId)
        .filter(message::Column::PatientId.is_in(patients.iter().cloned()))
        .into_tuple()
        .all(db)
        .await
        .unwrap();
    let unmatched: Vec<Option<String>> = unmatched_inbound::Entity::find()
        .select_only()
        .column(unmatched_inbound::Column::ProviderMessageId)
        .into_tuple()
        .all(db)
        .await
        .unwrap();
    let conversations: Vec<(String, i64)> = conversation::Entity::find()
        .select_only()
        .column(conversation::Column::PatientId)
        .column(conversation::Column::LastSeq)
        .filter(conversation::Column::PatientId.is_in(patients.iter().cloned()))
        .into_tuple()
        .all(db)
        .await
        .unwrap();
    let receipts: Vec<String> = inbound_receipt::Entity::find()
        .select_only()
        .column(inbound_receipt::Column::ProviderMessageId)
        .into_tuple()
        .all(db)
        .await
        .unwrap();
    let receipts: std::collections::HashSet<String> = receipts.into_iter().collect();

    let mut by_body: HashMap<(&str, &str), Vec<i64>> = HashMap::new();
    let mut by_provider: HashMap<&str, usize> = HashMap::new();
    let mut seqs: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (patient, seq, body, provider) in &rows {
        by_body.entry((patient, body)).or_default().push(*seq);
        if let Some(id) = provider {
            *by_provider.entry(id).or_default() += 1;
        }
        seqs.entry(patient).or_default().push(*seq);
    }
    for id in unmatched.iter().flatten() {
        *by_provider.entry(id).or_default() += 1;
    }

    let mut out = Readback {
        stored: rows.len(),
        ..Readback::default()
    };
    for op in ops {
        let label = format!("{:?} {}", op.kind, txn_id(&op.key));
        let (count, seq) = match op.kind {
            Kind::Portal | Kind::Staff => {
                let found = by_body.get(&(op.patient.as_str(), op.key.as_str()));
                (
                    found.map_or(0, Vec::len),
                    found.and_then(|s| s.first().copied()),
                )
            }
            Kind::Inbound | Kind::Unmatched => {
                (by_provider.get(op.key.as_str()).copied().unwrap_or(0), None)
            }
            // A date-of-birth reply is no message; its receipt records it once.
            Kind::DobReply => (usize::from(receipts.contains(&op.key)), None),
            Kind::SmsStart => continue,
        };
        if count > 1 {
            out.duplicates.push(format!("{label} ×{count}"));
        }
        if op.acked() && count == 0 {
            out.lost.push(label.clone());
        }
        if !op.maybe_arrived() && count > 0 {
            out.phantoms.push(label.clone());
        }
        if !op.acked() && op.retried.is_none() && count > 0 {
            if let Answer::Status(status, body) = &op.answer {
                out.stored_after_error
                    .push(format!("{label}: {status} {body}"));
            }
        }
        if op.answer.ok()
            && let (Some(stored), Some(answered)) = (seq, op.answer.json()["seq"].as_i64())
            && stored != answered
        {
            out.wrong_seq
                .push(format!("{label}: answered {answered}, stored {stored}"));
        }
    }
    let last: HashMap<&str, i64> = conversations
        .iter()
        .map(|(p, s)| (p.as_str(), *s))
        .collect();
    for (patient, mut list) in seqs {
        list.sort_unstable();
        let gapless = list.iter().enumerate().all(|(i, s)| *s == i as i64 + 1);
        let last_seq = last.get(patient).copied().unwrap_or(-1);
        if !gapless || last_seq != list.len() as i64 {
            out.gaps.push(format!(
                "{patient}: {} messages, last_seq {last_seq}, gapless {gapless}",
                list.len()
            ));
        }
    }
    out
}

/// The loopback outbox, read back: lines, lines that did not parse (a line torn by
/// a kill), and the texts found more than once — by `delivery_id` when the line has
/// one, otherwise by body for bodies starting with `marker` (the tests' unique texts).
#[derive(Debug, Default)]
pub struct Outbox {
    pub lines: usize,
    pub torn: usize,
    pub twice: Vec<String>,
}

/// Reads `path` (absent: empty).
pub fn read_outbox(path: &Path, marker: &str) -> Outbox {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Outbox::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        out.lines += 1;
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            out.torn += 1;
            continue;
        };
        let key = match (value["delivery_id"].as_str(), value["body"].as_str()) {
            (Some(id), _) => format!("delivery {id}"),
            (None, Some(body)) if body.starts_with(marker) => format!("body {body}"),
            _ => continue,
        };
        *seen.entry(key).or_default() += 1;
    }
    out.twice = seen
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(k, n)| format!("{k} ×{n}"))
        .collect();
    out.twice.sort();
    out
}

/// A tally of answers by status, for the figures.
pub fn tally<'a>(answers: impl IntoIterator<Item = &'a Answer>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for answer in answers {
        let key = match answer {
            Answer::Status(s, _) => s.to_string(),
            Answer::NotSent => "not sent".to_owned(),
            Answer::Unknown(_) => "no answer".to_owned(),
        };
        *out.entry(key).or_default() += 1;
    }
    out
}

/// A tmpfs mounted for a test, unmounted when dropped.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "4m") at `path`; `Err` with the reason when
    /// mounting is refused (not root, no capability).
    pub fn mount(path: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if out.status.success() {
            Ok(Self {
                path: path.to_owned(),
            })
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// Changes its size (`mount -o remount,size=…`).
    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount size={size}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
