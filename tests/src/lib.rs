//! The end-to-end test harness: starts the real daemon in-process on `127.0.0.1:0`
//! with a fresh database — a SQLite file in a temporary directory, or, when
//! `DATABASE_URL` names a PostgreSQL server, a new database on it — and an injected
//! clock.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test harness: a panic is a failed test.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use caremsgd::clock::ManualClock;
use caremsgd::reload::ConfigSource;
use caremsgd::{Options, Running};
use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use sea_orm::{ConnectionTrait, Database};
use serde_json::Value;

/// The development tokens of `config/caremsg.toml`.
pub const ADMIN_TOKEN: &str = "dev-admin-token";
/// Staff application token.
pub const STAFF_TOKEN: &str = "dev-staff-token";
/// Portal backend token.
pub const PORTAL_TOKEN: &str = "dev-portal-token";

/// Where the test's database lives.
#[derive(Debug, Clone)]
pub enum TestDb {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A database created on the PostgreSQL server for this test.
    Postgres {
        /// The server's URL for administrative statements.
        admin_url: String,
        /// The new database's name.
        name: String,
    },
}

impl TestDb {
    /// A fresh database: PostgreSQL when `DATABASE_URL` says so, else SQLite in `dir`.
    pub async fn create(dir: &Path) -> anyhow::Result<Self> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if url.starts_with("postgres") => {
                let name = format!("caremsg_t_{}", uuid::Uuid::new_v4().simple());
                let admin = Database::connect(&url)
                    .await
                    .context("connecting to DATABASE_URL")?;
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await?;
                admin.close().await?;
                Ok(Self::Postgres {
                    admin_url: url,
                    name,
                })
            }
            _ => Ok(Self::Sqlite(dir.join("caremsg.db"))),
        }
    }

    /// The URL the daemon connects with.
    pub fn url(&self) -> String {
        match self {
            Self::Sqlite(path) => format!("sqlite://{}?mode=rwc", path.display()),
            Self::Postgres { admin_url, name } => {
                let base = admin_url
                    .rsplit_once('/')
                    .map_or(admin_url.as_str(), |(b, _)| b);
                format!("{base}/{name}")
            }
        }
    }

    /// Drops a PostgreSQL test database (a SQLite file goes with its directory).
    pub async fn drop_database(&self) {
        if let Self::Postgres { admin_url, name } = self
            && let Ok(admin) = Database::connect(admin_url).await
        {
            let _ = admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
            let _ = admin.close().await;
        }
    }
}

/// A running daemon and what a test needs to talk to it.
pub struct TestDaemon {
    /// The daemon; `None` once stopped.
    pub running: Option<Running>,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// An HTTP client.
    pub http: reqwest::Client,
    /// The injected clock.
    pub clock: ManualClock,
    /// The config file the daemon was started with (tests edit it and reload).
    pub config_path: PathBuf,
    /// The database.
    pub db: TestDb,
    /// The state directory (removed on drop).
    pub dir: tempfile::TempDir,
}

/// The config text a test daemon starts with: the embedded default, with the state
/// directory and listen address of this test. (The database URL is given as the
/// `CAREMSG__DATABASE__URL` override, as an operator's environment would.)
pub fn test_config(dir: &Path) -> String {
    let text = caremsg_config::EMBEDDED_DEFAULT
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = {:?}", dir.display().to_string()),
        )
        .replace("listen = \"127.0.0.1:8680\"", "listen = \"127.0.0.1:0\"");
    with_test_gateway(text, dir)
}

/// Points the embedded default's loopback gateway at the library Cargo built for this
/// test run (an absolute path: tests do not run from the workspace root) and its
/// outbox into `dir` (`<dir>/loopback-outbox.jsonl`).
pub fn with_test_gateway(text: String, dir: &Path) -> String {
    let library = caremsg_testplugins::library_path(caremsg_testplugins::SMS_LOOPBACK)
        .expect("the sms-loopback plugin is built (a dependency of this crate)");
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with("library = ") && line.contains("caremsg_sms_loopback") {
            out.push_str(&format!("library = {:?}", library.display().to_string()));
        } else if line.starts_with("config = { outbox = ") {
            let outbox = dir.join("loopback-outbox.jsonl");
            out.push_str(&format!(
                "config = {{ outbox = {:?} }}",
                outbox.display().to_string()
            ));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// The default start time of the injected clock.
pub fn epoch() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-02T15:00:00Z")
        .map(|t| t.to_utc())
        .unwrap_or_else(|_| Utc::now())
}

impl TestDaemon {
    /// Starts a daemon on the embedded default config.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|text| text).await
    }

    /// Starts a daemon on the embedded default config as changed by `edit`.
    pub async fn start_with(edit: impl FnOnce(String) -> String) -> anyhow::Result<Self> {
        Self::start_in(tempfile::tempdir()?, edit).await
    }

    /// Like [`TestDaemon::start_with`], with `dir` as the state directory (a test
    /// that mounts a small file system there, say).
    pub async fn start_in(
        dir: tempfile::TempDir,
        edit: impl FnOnce(String) -> String,
    ) -> anyhow::Result<Self> {
        let db = TestDb::create(dir.path()).await?;
        let config_path = dir.path().join("caremsg.toml");
        std::fs::write(&config_path, edit(test_config(dir.path())))?;
        let clock = ManualClock::new(epoch());
        let running = Self::boot(&config_path, &db, clock.clone()).await?;
        let base = format!("http://{}", running.local_addr());
        Ok(Self {
            running: Some(running),
            base,
            http: reqwest::Client::new(),
            clock,
            config_path,
            db,
            dir,
        })
    }

    async fn boot(config_path: &Path, db: &TestDb, clock: ManualClock) -> anyhow::Result<Running> {
        let env = vec![("CAREMSG__DATABASE__URL".to_owned(), db.url())];
        let settings = caremsg_config::load_with_env(Some(config_path), env.clone())?;
        let options = Options {
            source: ConfigSource {
                path: Some(config_path.to_owned()),
                env,
            },
            clock: Arc::new(clock),
            log_filter: None,
        };
        caremsgd::start(settings, options).await
    }

    /// Stops the daemon gracefully and starts it again on the same database and
    /// clock (a restart).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(running) = self.running.take() {
            running.shutdown().await?;
        }
        let running = Self::boot(&self.config_path, &self.db, self.clock.clone()).await?;
        self.base = format!("http://{}", running.local_addr());
        self.running = Some(running);
        Ok(())
    }

    /// The running daemon.
    pub fn daemon(&self) -> &Running {
        self.running.as_ref().expect("the daemon is running")
    }

    /// Client connections the daemon closed for `reason`
    /// (`caremsg_http_connections_closed_total`).
    pub fn connections_closed(&self, reason: &str) -> u64 {
        self.daemon()
            .state()
            .metrics
            .http_connections_closed
            .get_or_create(&caremsgd::metrics::CloseLabels {
                reason: reason.to_owned(),
            })
            .get()
    }

    /// A connection to the daemon with a 4 KiB receive buffer: a client that does not
    /// read soon fills the daemon's side.
    pub async fn connect_with_small_window(&self) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket
            .set_recv_buffer_size(4096)
            .expect("a small receive buffer");
        socket
            .connect(self.daemon().local_addr())
            .await
            .expect("connected")
    }

    /// Stops the daemon and drops a PostgreSQL test database.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(running) = self.running.take() {
            running.shutdown().await?;
        }
        self.db.drop_database().await;
        Ok(())
    }

    /// Sends a request with a token (and a JSON body), returning status and JSON.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        self.call_as(method, path, token, None, body).await
    }

    /// Like [`TestDaemon::call`], acting as a staff user.
    pub async fn call_as(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        user: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(user) = user {
            request = request.header("X-Caremsg-User", user);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.expect("the daemon answers");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, json)
    }

    /// The value of one sample on `/metrics`, named with its labels exactly as the
    /// text format prints them (`caremsg_x_total{a="b"}`); 0 when it is absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("the daemon answers")
            .text()
            .await
            .unwrap_or_default();
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// `PUT` as the admin client.
    pub async fn admin_put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, path, Some(ADMIN_TOKEN), Some(&body))
            .await
    }

    /// Creates a practice `id` (US, SMS and portal on, one loopback number).
    pub async fn practice(&self, id: &str) {
        let (status, body) = self
            .admin_put(&format!("/v1/admin/practices/{id}"), practice_body(id))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// Creates a program of a practice.
    pub async fn program(&self, practice: &str, id: &str) {
        let (status, body) = self
            .admin_put(
                &format!("/v1/admin/practices/{practice}/programs/{id}"),
                serde_json::json!({"name": id}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// Creates a user of a practice, restricted from `restricted` programs.
    pub async fn user(&self, practice: &str, id: &str, restricted: &[&str]) {
        let (status, body) = self
            .admin_put(
                &format!("/v1/admin/users/{id}"),
                serde_json::json!({"practice_id": practice, "name": format!("User {id}"),
                    "email": format!("{id}@clinic.example"), "restricted_programs": restricted}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// A text from `from` to practice `practice`'s first number, routed as a gateway
    /// hands one over (a new provider message id each time).
    pub async fn text_to(
        &self,
        practice: &str,
        from: &str,
        body: &str,
    ) -> caremsgd::gateways::inbound::EventOutcome {
        use caremsg_entities::practice_sms_number;
        use caremsgd::gateways::inbound::{InboundSms, route};
        use caremsgd::phi::Phi;
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
        static NEXT_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let to = practice_sms_number::Entity::find()
            .filter(practice_sms_number::Column::PracticeId.eq(practice))
            .order_by_asc(practice_sms_number::Column::Number)
            .one(&self.daemon().state().db)
            .await
            .unwrap()
            .unwrap()
            .number;
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sms = InboundSms {
            gateway: "loopback".into(),
            provider_message_id: format!("in-{id}"),
            from: Phi::new(from.to_owned()),
            to: Phi::new(to),
            body: Phi::new(body.to_owned()),
        };
        route(self.daemon().state(), sms).await.unwrap()
    }

    /// The messages of `patient`'s conversation, oldest first (from the database).
    pub async fn messages_of(&self, patient: &str) -> Vec<caremsg_entities::message::Model> {
        use caremsg_entities::message;
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
        message::Entity::find()
            .filter(message::Column::PatientId.eq(patient))
            .order_by_asc(message::Column::Seq)
            .all(&self.daemon().state().db)
            .await
            .unwrap()
    }

    /// Creates a patient of a practice.
    pub async fn patient(&self, practice: &str, id: &str, programs: &[&str], care_team: &[&str]) {
        let (status, body) = self
            .admin_put(
                &format!("/v1/admin/patients/{id}"),
                patient_body(practice, programs, care_team),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

/// A valid practice body, with a sending number of its own (555-01xx, fictional).
pub fn practice_body(id: &str) -> Value {
    let n = id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % 100;
    serde_json::json!({
        "name": format!("Clinic {id}"), "sms_enabled": true, "portal_enabled": true,
        "country": "US", "timezone": "America/New_York",
        "sms_numbers": [{"number": format!("+1201555{:04}", 100 + n), "gateway": "loopback"}],
    })
}

/// A valid patient body.
pub fn patient_body(practice: &str, programs: &[&str], care_team: &[&str]) -> Value {
    serde_json::json!({
        "practice_id": practice, "first_name": "Pat", "last_name": "Example",
        "date_of_birth": "1950-04-07", "mobile_phone": "(201) 555-0123",
        "portal_enrolled": true, "programs": programs, "care_team": care_team,
    })
}
