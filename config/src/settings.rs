//! The typed settings: one struct per section of `caremsg.toml`, with their defaults.
//!
//! Every field's doc comment states its meaning, its default and whether a reload
//! (SIGHUP) may change it. Two tests hold the docs to that: one reads this file and
//! checks each field mentions "Default" and "Reloadable", the other changes each field
//! in turn and checks [`crate::reload_plan`] agrees with the "Reloadable: yes/no" it
//! documents. `caremsg.production.toml` lists every field (a drift test checks it).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything the daemon reads from its configuration file and environment.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Directory for the daemon's own files: the SQLite database (when
    /// `database.url` is absent) and whatever plugins are told to keep there. A relative
    /// path resolves against the daemon's working directory.
    /// Default: "state". Reloadable: no.
    pub state_dir: PathBuf,
    /// The HTTP listener and its limits.
    /// Default: see the fields of `Server`. Reloadable: per field.
    pub server: Server,
    /// The database connection.
    /// Default: see the fields of `Database`. Reloadable: per field.
    pub database: Database,
    /// Logging to stderr.
    /// Default: see the fields of `Log`. Reloadable: per field.
    pub log: Log,
    /// The API clients allowed to call the daemon, each with a bearer token (stored as
    /// its SHA-256) and its scopes. A reload replaces the whole list at once.
    /// Default: none (no client can call the API). Reloadable: yes.
    pub clients: Vec<ApiClient>,
    /// The single database writer and its queue.
    /// Default: see the fields of `Writer`. Reloadable: per field.
    pub writer: Writer,
    /// Limits and timers of conversations.
    /// Default: see the fields of `Conversations`. Reloadable: per field.
    pub conversations: Conversations,
    /// SMS authentication (the 'Text Messages' button): attempts, window and texts.
    /// Default: see the fields of `SmsAuth`. Reloadable: per field.
    pub sms_auth: SmsAuth,
    /// Staff notifications: the unread reminder and notification emails.
    /// Default: see the fields of `Notifications`. Reloadable: per field.
    pub notifications: Notifications,
    /// How long operational rows are kept before the background pruner removes them.
    /// Default: see the fields of `Retention`. Reloadable: per field.
    pub retention: Retention,
    /// The server-sent event streams (staff and portal): caps, buffers, idle limit.
    /// Default: see the fields of `Events`. Reloadable: per field.
    pub events: Events,
    /// The gateway plugin instances (`[[gateways]]` tables), one per provider account.
    /// Adding, removing, renaming or reordering instances needs a restart.
    /// Default: none. Reloadable: per field (the list itself: no).
    pub gateways: Vec<Gateway>,
    /// High availability: one daemon, or an active and a standby on one PostgreSQL.
    /// Default: see the fields of `Ha`. Reloadable: per field.
    pub ha: Ha,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("state"),
            server: Server::default(),
            database: Database::default(),
            log: Log::default(),
            clients: Vec::new(),
            writer: Writer::default(),
            conversations: Conversations::default(),
            sms_auth: SmsAuth::default(),
            notifications: Notifications::default(),
            retention: Retention::default(),
            events: Events::default(),
            gateways: Vec::new(),
            ha: Ha::default(),
        }
    }
}

impl Settings {
    /// The database URL to connect to: `database.url` when set, else the SQLite file
    /// `<state_dir>/caremsg.db`, created if missing (`sqlite://...?mode=rwc`).
    pub fn database_url(&self) -> String {
        match &self.database.url {
            Some(url) => url.clone(),
            None => {
                let path = self.state_dir.join("caremsg.db");
                format!(
                    "sqlite://{}?mode=rwc",
                    percent_encode_sqlite_path(&path.to_string_lossy())
                )
            }
        }
    }
}

/// Escapes the characters sqlx's SQLite URL parser percent-decodes or splits on, so a
/// state directory containing `%`, `?` or `#` still names the right file.
fn percent_encode_sqlite_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3F"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

/// The HTTP server.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Address and port the HTTP API listens on (an IP address, not a host name). Keep
    /// it on loopback or a private network: `/metrics` and `/healthz` carry no token.
    /// Default: "127.0.0.1:8680". Reloadable: no.
    pub listen: SocketAddr,
    /// The URL under which providers and the platform reach this daemon, used to build
    /// webhook and status-callback URLs handed to gateway plugins.
    /// Default: "http://127.0.0.1:8680". Reloadable: yes.
    pub public_url: String,
    /// Longest time one API request may take before it is answered with a timeout.
    /// Does not apply to event streams.
    /// Default: "30s". Reloadable: yes.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    /// Default: 1048576 (1 MiB). Reloadable: yes.
    pub max_body_bytes: usize,
    /// On SIGTERM, how long in-flight requests and queued writes may take to finish
    /// before the daemon exits anyway.
    /// Default: "10s". Reloadable: yes.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Interval of keep-alive comments on idle event streams, so proxies keep them open.
    /// Default: "15s". Reloadable: yes.
    #[serde(with = "humantime_serde")]
    pub sse_keepalive: Duration,
    /// How long a client may take to send a request's head (request line and
    /// headers), counted from its first byte; a connection that trickles its head
    /// slower is closed.
    /// Default: "10s". Reloadable: yes.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no request in progress (a new
    /// connection that sends nothing, or a kept-alive one between requests) before it
    /// is closed.
    /// Default: "60s". Reloadable: yes.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a response may wait for its client to read it: when the daemon can
    /// write none of a response's bytes (or an event stream's) for this long because
    /// the client stopped reading, the connection is closed. Bounds the connections
    /// held by clients that never read what they asked for.
    /// Default: "30s". Reloadable: yes.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Most client connections open at once (event streams included). A connection
    /// past the cap closes the longest-idle connection without a request in progress;
    /// when every connection is busy it waits, in the listen backlog, until one ends.
    /// The systemd unit's `LimitNOFILE=` (4096) leaves room for 1,024 connections
    /// and the database, plugins and log.
    /// Default: 1024. Reloadable: yes.
    pub max_connections: usize,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8680)),
            public_url: "http://127.0.0.1:8680".to_owned(),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            shutdown_timeout: Duration::from_secs(10),
            sse_keepalive: Duration::from_secs(15),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// The server-sent event streams (`/v1/staff/events`, `/v1/portal/patients/{id}/events`).
/// Keep-alive comments are `server.sse_keepalive`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Events {
    /// Most streams open at once, all users and patients together; one more is
    /// refused with 503 `stream_capacity` and `Retry-After`. Each stream holds a
    /// connection (a file descriptor): keep it below the connection cap.
    /// Default: 2048. Reloadable: yes (applies to streams opened after the reload).
    pub max_streams: usize,
    /// Most streams open at once per staff user, and per patient on the portal; one
    /// more is refused with 429 `too_many_streams` and `Retry-After`.
    /// Default: 16. Reloadable: yes (applies to streams opened after the reload).
    pub max_streams_per_subscriber: usize,
    /// Events one stream may have waiting to be written; a consumer that falls this
    /// far behind is dropped (its stream ends with an `end` event, reason
    /// `slow_consumer`) rather than buffered without bound. The client re-reads the
    /// conversation and reconnects.
    /// Default: 256. Reloadable: yes (applies to streams opened after the reload).
    pub buffer: usize,
    /// A stream that delivered no event for this long ends (an `end` event, reason
    /// `idle`); keep-alive comments do not count. Clients reconnect.
    /// Default: "30min". Reloadable: yes (applies to streams opened after the reload).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// An event that arrives within this long of a stream's last write of events
    /// waits for the end of that spell and is written with whatever else arrived in
    /// it: under a burst a stream makes one socket write per spell, not one per
    /// commit. The first event after a quiet spell is written at once, so a lone
    /// event is never delayed; in a burst an event is at most this late. "0s" writes
    /// every commit's events as they come. At most "1s".
    /// Default: "100ms". Reloadable: yes (applies to streams opened after the reload).
    #[serde(with = "humantime_serde")]
    pub coalesce: Duration,
    /// Whether the daemon writes an event to a quiet stream's connection as it
    /// publishes it (one socket write, no task woken) rather than handing it to the
    /// stream's task. The bytes a client reads are the same either way; `false`
    /// takes every event through the stream's task, as before this setting existed.
    /// Default: true. Reloadable: yes (applies to streams opened after the reload).
    pub direct_writes: bool,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            max_streams: 2048,
            max_streams_per_subscriber: 16,
            buffer: 256,
            idle_timeout: Duration::from_secs(30 * 60),
            coalesce: Duration::from_millis(100),
            direct_writes: true,
        }
    }
}

/// The database connection pool.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Database {
    /// Database URL: `postgres://user[:password]@host/dbname` or `sqlite://path`.
    /// When absent, the SQLite file `<state_dir>/caremsg.db` (see
    /// `Settings::database_url`). Prefer `CAREMSG__DATABASE__URL` in the environment
    /// for a URL carrying a password.
    /// Default: absent. Reloadable: no.
    pub url: Option<String>,
    /// Most connections the pool opens.
    /// Default: 8. Reloadable: no.
    pub max_connections: u32,
    /// How long SQLite waits for a lock held by another connection before failing.
    /// Ignored by PostgreSQL.
    /// Default: "5s". Reloadable: no.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// How long opening a connection may take, at start and when the pool grows.
    /// Default: "10s". Reloadable: no.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for Database {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 8,
            busy_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Written by hand so a password in `url` never reaches a log line.
impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("url", &self.url.as_deref().map(redact_url_password))
            .field("max_connections", &self.max_connections)
            .field("busy_timeout", &self.busy_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// `scheme://user:secret@host/...` becomes `scheme://user:[redacted]@host/...`; a URL
/// without a password is returned unchanged.
pub(crate) fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some((user, _password)) = userinfo.split_once(':') else {
        return url.to_owned();
    };
    format!("{scheme}://{user}:[redacted]{}", &rest[at..])
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// Which events are logged: a `tracing_subscriber::EnvFilter` directive such as
    /// "info" or "info,caremsgd=debug". `RUST_LOG`, when set, wins at start.
    /// Default: "info". Reloadable: yes.
    pub level: String,
    /// Line format on stderr: "text" for people, "json" for log shippers.
    /// Default: "text". Reloadable: no.
    pub format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// Format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// One API client: a program (the platform, the portal backend, an operator's tool)
/// calling the daemon with a bearer token.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiClient {
    /// Name of the client, unique, written to the audit log with every action it takes.
    /// Default: none (required). Reloadable: yes.
    pub name: String,
    /// Lowercase hex SHA-256 of the client's bearer token (64 characters); the token
    /// itself is never stored. Make one with `caremsg_config::hash_token` or
    /// `printf %s "$TOKEN" | sha256sum`.
    /// Default: none (required). Reloadable: yes.
    pub token_sha256: String,
    /// What the client may do: "admin" (platform sync), "staff" (staff API on behalf of
    /// users), "portal" (the portal backend). At least one.
    /// Default: none (required). Reloadable: yes.
    pub scopes: Vec<Scope>,
    /// The practices (platform ids) this client serves: a request about any other
    /// practice is answered as for another practice (404) — staff requests by the
    /// acting user's practice, portal requests by the patient's, admin upserts and
    /// deletes by the practice they name. Absent: every practice, the less safe choice
    /// (one leaked token then reaches every clinic); name them where one client serves
    /// a known set of clinics. An empty list serves none.
    /// Default: absent (every practice). Reloadable: yes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub practices: Option<Vec<String>>,
}

impl ApiClient {
    /// Whether this client may act about practice `practice_id` (see `practices`).
    pub fn serves(&self, practice_id: &str) -> bool {
        self.practices
            .as_ref()
            .is_none_or(|list| list.iter().any(|p| p == practice_id))
    }

    /// Whether `token` is this client's bearer token: its SHA-256 is compared with
    /// `token_sha256` in constant time.
    pub fn matches_token(&self, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        let hash = crate::hash_token(token);
        bool::from(hash.as_bytes().ct_eq(self.token_sha256.as_bytes()))
    }
}

/// What an API client may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The admin sync API (practices, users, patients, programs).
    Admin,
    /// The staff API, acting as the user named in `X-Caremsg-User`.
    Staff,
    /// The portal API, acting for one patient.
    Portal,
}

/// High availability (`[ha]`): active–passive failover on one PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ha {
    /// `"single"`: this daemon is alone on its database and always active.
    /// `"active-passive"`: several daemons share one PostgreSQL database and only the
    /// one holding the lease is active; the others answer 503 `standby` (PostgreSQL
    /// only). Default: "single". Reloadable: no.
    pub mode: HaMode,
    /// How often the active daemon renews its lease.
    /// Default: "5s". Reloadable: no.
    #[serde(with = "humantime_serde")]
    pub lease_renew: Duration,
    /// How long a lease lasts without renewal (on PostgreSQL's clock) before a standby
    /// may take over; more than `lease_renew`.
    /// Default: "15s". Reloadable: no.
    #[serde(with = "humantime_serde")]
    pub lease_expiry: Duration,
}

impl Default for Ha {
    fn default() -> Self {
        Self {
            mode: HaMode::Single,
            lease_renew: Duration::from_secs(5),
            lease_expiry: Duration::from_secs(15),
        }
    }
}

/// Whether the daemon shares its database with a standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HaMode {
    /// Alone on the database.
    Single,
    /// One active daemon, the others standby.
    ActivePassive,
}

/// The single database writer that batches changes into transactions.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Writer {
    /// Most units of work committed in one transaction.
    /// Default: 512. Reloadable: no.
    pub max_batch_units: usize,
    /// Capacity of the writer's queue; when full, callers wait (back-pressure).
    /// Default: 8192. Reloadable: no.
    pub queue_depth: usize,
}

impl Default for Writer {
    fn default() -> Self {
        Self {
            max_batch_units: 512,
            queue_depth: 8192,
        }
    }
}

/// Conversations.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Conversations {
    /// A conversation without activity for this long is unloaded from memory (it is
    /// loaded again from the database on next use).
    /// Default: "10min". Reloadable: yes.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most conversations held in memory at once. A conversation loaded beyond it
    /// first unloads the least recently used ones (they are loaded again from the
    /// database on next use).
    /// Default: 10000. Reloadable: yes.
    pub max_live: usize,
    /// Longest message body, in Unicode characters, that will go out by SMS.
    /// Default: 1600. Reloadable: yes.
    pub sms_body_max_chars: usize,
    /// Longest body, in Unicode characters, of a message that goes out by the portal only.
    /// Default: 10000. Reloadable: yes.
    pub portal_body_max_chars: usize,
}

impl Default for Conversations {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(10 * 60),
            max_live: 10_000,
            sms_body_max_chars: 1600,
            portal_body_max_chars: 10_000,
        }
    }
}

/// How long operational rows are kept. Messages, the audit log and the SMS status
/// history are records and are never pruned; these are what caremsg keeps only to
/// work: fired timers, inbound receipts (the provider-retry dedup), parked delivery
/// receipts, and the texts of unknown numbers (PHI).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Fired (and dead-lettered) timers, inbound receipts and parked delivery receipts
    /// older than this are pruned. Keep it longer than any provider retries a webhook.
    /// Default: "30days". Reloadable: yes.
    #[serde(with = "humantime_serde")]
    pub operational: Duration,
    /// Texts from numbers that are no patient's (`unmatched_inbound`, PHI from
    /// unknown numbers) older than this are pruned.
    /// Default: "30days". Reloadable: yes.
    #[serde(with = "humantime_serde")]
    pub unmatched_inbound: Duration,
    /// Time between two pruning runs.
    /// Default: "1h". Reloadable: yes.
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// Most rows one pruning statement removes (each batch is one write unit, so
    /// pruning never holds the writer long).
    /// Default: 1000. Reloadable: yes.
    pub prune_batch: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            operational: Duration::from_secs(30 * 24 * 60 * 60),
            unmatched_inbound: Duration::from_secs(30 * 24 * 60 * 60),
            prune_interval: Duration::from_secs(60 * 60),
            prune_batch: 1000,
        }
    }
}

/// SMS authentication of a patient's mobile number.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmsAuth {
    /// Wrong date-of-birth replies allowed; the last one sets the status to failed.
    /// Default: 3. Reloadable: yes.
    pub max_attempts: u32,
    /// How long after the newest opt-in text a correct reply is accepted; after that
    /// the status becomes failed (reason `expired`).
    /// Default: "14days". Reloadable: yes.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// The texts sent during authentication (not the opt-in text, whose wording is fixed).
    /// Default: see the fields of `SmsTemplates`. Reloadable: per field (all yes).
    pub templates: SmsTemplates,
}

impl Default for SmsAuth {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            window: Duration::from_secs(14 * 24 * 60 * 60),
            templates: SmsTemplates::default(),
        }
    }
}

/// Texts sent to patients during SMS authentication. Each may use `{practice}` (the
/// practice's display name) and is at most 160 characters before that is filled in.
/// None may contain a date of birth or a patient's name (they have no placeholder for
/// them on purpose).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmsTemplates {
    /// Sent when the patient replied with the right date of birth.
    /// Default: "{practice}: Thank you, you are confirmed. ...". Reloadable: yes.
    pub confirmed: String,
    /// Sent after a wrong reply while attempts remain, asking again.
    /// Default: "{practice}: We could not confirm your identity. ...". Reloadable: yes.
    pub wrong_reply: String,
    /// Sent when authentication failed (last attempt used), telling the patient to
    /// contact the practice.
    /// Default: "{practice}: We could not confirm your identity. ...". Reloadable: yes.
    pub failed: String,
    /// Reply to HELP or INFO: who is texting and how to opt out.
    /// Default: "{practice} care team texts. ...". Reloadable: yes.
    pub help: String,
    /// The one confirmation of an opt-out (STOP and the other opt-out keywords).
    /// Default: "{practice}: You are opted out ...". Reloadable: yes.
    pub opted_out: String,
}

impl Default for SmsTemplates {
    fn default() -> Self {
        Self {
            confirmed: "{practice}: Thank you, you are confirmed. You can now text your care team \
                        here. Reply HELP for help or STOP to opt out."
                .to_owned(),
            wrong_reply: "{practice}: We could not confirm your identity. Please reply with your \
                          date of birth as MM/DD/YYYY. Reply STOP to opt out."
                .to_owned(),
            failed: "{practice}: We could not confirm your identity. Please contact {practice} \
                     to set up text messages."
                .to_owned(),
            help: "{practice} care team texts. Reply STOP to opt out. Msg & data rates may \
                   apply. In an emergency, call your local emergency number."
                .to_owned(),
            opted_out: "{practice}: You are opted out and will get no more texts from us. Reply \
                        START to opt back in."
                .to_owned(),
        }
    }
}

/// Staff notifications.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Notifications {
    /// A patient message unviewed this long sends an Unread Message Reminder to users who
    /// have that setting on.
    /// Default: "24h". Reloadable: yes.
    #[serde(with = "humantime_serde")]
    pub unread_reminder_after: Duration,
    /// Name of the `[[gateways]]` instance (of kind "email") that sends notification
    /// emails. When absent, notifications are in-app only.
    /// Default: absent. Reloadable: yes.
    pub email_gateway: Option<String>,
    /// Start of the link to a patient's conversation in the platform, put in emails as
    /// `{link}`: the platform's patient id is appended.
    /// Default: "http://127.0.0.1:3000/patients/". Reloadable: yes.
    pub link_base_url: String,
    /// Subject of notification emails. May use `{practice}`, `{kind}` (e.g. "New
    /// patient message") and `{link}`; must carry no PHI (no patient name, no text).
    /// Default: "{practice}: {kind}". Reloadable: yes.
    pub email_subject: String,
    /// Body of notification emails, plain text, with the same placeholders as
    /// `email_subject` and the same rule: no PHI, a link instead.
    /// Default: "You have a new notification from {practice}: {kind}. ...". Reloadable: yes.
    pub email_body: String,
}

impl Default for Notifications {
    fn default() -> Self {
        Self {
            unread_reminder_after: Duration::from_secs(24 * 60 * 60),
            email_gateway: None,
            link_base_url: "http://127.0.0.1:3000/patients/".to_owned(),
            email_subject: "{practice}: {kind}".to_owned(),
            email_body: "You have a new notification from {practice}: {kind}.\n\n\
                         Open it here: {link}\n\n\
                         For privacy this email contains no patient information.\n"
                .to_owned(),
        }
    }
}

/// One gateway plugin instance: a shared library and its settings.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// Name of the instance, unique; it is the `{gateway_instance}` in the webhook path
    /// `/v1/hooks/{gateway_instance}`, so letters, digits, '-' and '_' only.
    /// Default: none (required). Reloadable: no.
    pub name: String,
    /// What the plugin carries: "sms", "portal" or "email".
    /// Default: none (required). Reloadable: no.
    pub kind: GatewayKind,
    /// Path of the plugin's shared library (`.so`); relative paths resolve against the
    /// working directory.
    /// Default: none (required). Reloadable: no.
    pub library: PathBuf,
    /// The plugin's own settings (credentials, endpoints), handed to it as JSON; see the
    /// plugin's documentation. A reload hands the plugin the new table.
    /// Default: {} (empty table). Reloadable: yes.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// Most calls into the plugin running at once.
    /// Default: 8. Reloadable: no.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Host names the plugin's HTTP service may connect to; anything else is refused.
    /// Default: [] (no outbound HTTP). Reloadable: yes.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Outbound rate of this instance, in SMS segments (or messages, for other kinds)
    /// per second: the provider's allowed rate.
    /// Default: absent (unlimited). Reloadable: yes.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Outbound rate to any one recipient.
    /// Default: absent (unlimited). Reloadable: yes.
    #[serde(default)]
    pub per_recipient: Option<RateLimit>,
    /// Rate of caremsg's automatic answers to any one number (HELP replies,
    /// wrong-date-of-birth replies, answers to unknown numbers), so that two
    /// auto-responders cannot loop. Inbound texts are never limited: each is stored, and
    /// keywords (STOP, START, HELP) always take effect; an answer over the limit is not
    /// sent, and is counted (`caremsg_sms_answers_throttled_total`) and shown in the
    /// conversation or the unmatched-inbound log. `inbound_per_sender` is an older name.
    /// Default: absent (unlimited). Reloadable: yes.
    #[serde(default, alias = "inbound_per_sender")]
    pub auto_answers_per_sender: Option<RateLimit>,
    /// How often the daemon asks the plugin for its health (a blocking call under the
    /// instance's concurrency limit); the answer is the `caremsg_gateway_health` gauge,
    /// a field of `/readyz`, and a log line when it changes. At least 1s.
    /// Default: "30s". Reloadable: yes.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub health_interval: Duration,
    /// Whether `/readyz` answers 503 while the plugin reports itself down; otherwise a
    /// down gateway is only reported in its JSON.
    /// Default: false. Reloadable: yes.
    #[serde(default)]
    pub down_fails_readiness: bool,
}

fn default_health_interval() -> Duration {
    Duration::from_secs(30)
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

fn default_concurrency() -> usize {
    8
}

/// Written by hand so credentials in the plugin's `config` never reach a log line.
impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("library", &self.library)
            .field("config", &format_args!("[redacted]"))
            .field("concurrency", &self.concurrency)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("rate_limit", &self.rate_limit)
            .field("per_recipient", &self.per_recipient)
            .field("auto_answers_per_sender", &self.auto_answers_per_sender)
            .field("health_interval", &self.health_interval)
            .field("down_fails_readiness", &self.down_fails_readiness)
            .finish()
    }
}

/// What a gateway plugin carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayKind {
    /// Text messages to and from patients' phones.
    Sms,
    /// Alerts to the patient portal backend.
    Portal,
    /// Notification emails to staff.
    Email,
}

/// A token bucket: `burst` tokens, refilled at `per_second`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Tokens added per second (may be fractional, e.g. 0.5); greater than 0.
    /// Default: none (required). Reloadable: yes.
    pub per_second: f64,
    /// Most tokens held, i.e. the largest burst; at least 1.
    /// Default: none (required). Reloadable: yes.
    pub burst: u32,
}

#[cfg(test)]
#[allow(clippy::expect_used, reason = "a test fails loudly")]
mod tests {
    use super::*;

    #[test]
    fn database_url_defaults_to_sqlite_in_state_dir() {
        let mut s = Settings::default();
        assert_eq!(s.database_url(), "sqlite://state/caremsg.db?mode=rwc");
        s.state_dir = PathBuf::from("/var/lib/caremsg");
        assert_eq!(
            s.database_url(),
            "sqlite:///var/lib/caremsg/caremsg.db?mode=rwc"
        );
        s.state_dir = PathBuf::from("/srv/odd?dir#1%");
        assert_eq!(
            s.database_url(),
            "sqlite:///srv/odd%3Fdir%231%25/caremsg.db?mode=rwc"
        );
        s.database.url = Some("postgres://caremsg@localhost/caremsg".to_owned());
        assert_eq!(s.database_url(), "postgres://caremsg@localhost/caremsg");
    }

    #[test]
    fn matches_token_compares_hashes() {
        let client = ApiClient {
            name: "a".to_owned(),
            token_sha256: crate::hash_token("right"),
            scopes: vec![Scope::Admin],
            practices: None,
        };
        assert!(client.matches_token("right"));
        assert!(client.serves("any"));
        let scoped = ApiClient {
            practices: Some(vec!["p1".to_owned()]),
            ..client.clone()
        };
        assert!(scoped.serves("p1") && !scoped.serves("p2"));
        assert!(!client.matches_token("wrong"));
        assert!(!client.matches_token(""));
    }

    /// The GSM-7 basic character set: text made of it fits 160 characters per SMS.
    const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
                              ¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

    #[test]
    fn default_sms_templates_are_one_gsm7_segment_without_phi() {
        let t = SmsTemplates::default();
        for text in [
            &t.confirmed,
            &t.wrong_reply,
            &t.failed,
            &t.help,
            &t.opted_out,
        ] {
            let bare = text.replace("{practice}", "");
            assert!(bare.chars().all(|c| GSM7_BASIC.contains(c)), "{text}");
            assert!(text.chars().count() <= 160, "{text}");
            assert!(!bare.contains('{'), "{text}");
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let mut s = Settings::default();
        s.database.url = Some("postgres://caremsg:hunter2@db.example/caremsg".to_owned());
        s.gateways.push(Gateway {
            name: "twilio".to_owned(),
            kind: GatewayKind::Sms,
            library: PathBuf::from("x.so"),
            config: serde_json::json!({ "auth_token": "sekrit-token" }),
            concurrency: 8,
            allowed_hosts: Vec::new(),
            rate_limit: None,
            per_recipient: None,
            auto_answers_per_sender: None,
            health_interval: std::time::Duration::from_secs(30),
            down_fails_readiness: false,
        });
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("sekrit-token"), "{debug}");
        assert!(debug.contains("postgres://caremsg:[redacted]@db.example/caremsg"));
    }

    #[test]
    fn redact_url_password_cases() {
        let check = |url: &str, expected: &str| assert_eq!(redact_url_password(url), expected);
        check("postgres://u:p@h/db", "postgres://u:[redacted]@h/db");
        check("postgres://u:p@ss@h/db", "postgres://u:[redacted]@h/db");
        check("postgres://u@h/db", "postgres://u@h/db");
        check("postgres://h/db?x=a:b@c", "postgres://h/db?x=a:b@c");
        check("sqlite://state/caremsg.db", "sqlite://state/caremsg.db");
        check("not a url", "not a url");
    }
}
