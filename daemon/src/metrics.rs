//! Prometheus metrics, served in the text format at `/metrics`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of an HTTP response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The request method.
    pub method: String,
    /// The status class: 2xx, 4xx, 5xx.
    pub status: String,
}

/// Labels of a connection the server closed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// The bound that closed it: `header_read_timeout`, `idle_timeout`,
    /// `send_timeout`, or `evicted` (to make room past `server.max_connections`).
    pub reason: String,
}

/// Labels of a configuration reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied`, `unchanged` or `refused`.
    pub outcome: String,
}

/// Labels of the build-information gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The daemon's version (`Cargo.toml`).
    pub version: String,
}

/// Labels of a gateway outcome (deliveries and inbound events).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    /// The gateway instance's name.
    pub gateway: String,
    /// What happened, e.g. `sent`, `retry`, `refused`, `duplicate`.
    pub outcome: String,
}

/// Labels of a notification created.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotificationLabels {
    /// `new_patient_message`, `unread_reminder` or `sms_status`.
    pub kind: String,
    /// `in_app` (stored and pushed live) or `email` (queued for the email gateway).
    pub channel: String,
}

/// Labels of an outbound rate-limit wait.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    /// The gateway instance's name.
    pub gateway: String,
    /// `instance` (the account's rate) or `recipient` (the per-recipient rate).
    pub limit: String,
}

/// Labels of a count per gateway instance.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    /// The gateway instance's name.
    pub gateway: String,
}

/// Labels of a count per timer kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimerKindLabels {
    /// The timer's kind.
    pub kind: String,
}

/// Labels of a webhook request the plugin refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookRejectLabels {
    /// The gateway instance's name.
    pub gateway: String,
    /// The 4xx status the plugin answered (403: signature or source refused).
    pub status: String,
}

/// Labels of a gateway's health.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayHealthLabels {
    /// The gateway instance's name.
    pub gateway: String,
}

/// Every metric the daemon exports.
pub struct Metrics {
    // The registry renders the text format; the handles below update it.
    registry: Registry,
    /// Responses by method and status class.
    pub http_responses: Family<HttpLabels, Counter>,
    /// Client connections the server closed, by the bound that closed them.
    pub http_connections_closed: Family<CloseLabels, Counter>,
    /// Requests being handled now.
    pub http_in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Write units per committed batch.
    pub writer_batch_units: Histogram,
    /// Seconds from the start of a batch to its commit.
    pub writer_commit_seconds: Histogram,
    /// Units committed or failed by the writer.
    pub writer_units: Counter<u64, AtomicU64>,
    /// Configuration reloads by outcome.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Seconds a watchdog heartbeat took through the writer (queue wait and commit).
    pub writer_heartbeat_seconds: Histogram,
    /// Times the watchdog withheld a ping because a heartbeat was overdue.
    pub watchdog_stalls: Counter<u64, AtomicU64>,
    /// Always 1, labelled with the running version.
    pub build_info: Family<BuildLabels, Gauge>,
    /// Conversation messages stored (any author, any channel).
    pub messages_stored: Counter<u64, AtomicU64>,
    /// Deliveries waiting in the outbox (`queued`), read when scraped.
    pub outbox_depth: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Age in seconds of the oldest queued delivery, read when scraped.
    pub outbox_oldest_seconds: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Deliveries whose outcome is unknown (`reconcile`), read when scraped.
    pub deliveries_reconcile: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Conversation actors alive, read when scraped.
    pub actors_live: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Conversation actors asked to unload early, to stay within
    /// `conversations.max_live`.
    pub actors_unloaded: Counter<u64, AtomicU64>,
    /// Durable timers due and not yet fired, read when scraped.
    pub timers_due: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Outbox deliveries by gateway instance and outcome.
    pub gateway_deliveries: Family<GatewayLabels, Counter>,
    /// Inbound gateway events by instance and outcome.
    pub gateway_inbound: Family<GatewayLabels, Counter>,
    /// Seconds one plugin `send` took, queueing for a concurrency permit included.
    pub gateway_send_seconds: Histogram,
    /// Notifications created, by kind and channel.
    pub notifications: Family<NotificationLabels, Counter>,
    /// Outbound sends held back by a rate limit, by gateway and limit.
    pub rate_limit_waits: Family<RateLimitLabels, Counter>,
    /// Webhook requests the plugin refused (4xx), by gateway and status.
    pub webhook_rejects: Family<WebhookRejectLabels, Counter>,
    /// High availability: 1 while this daemon is active, 0 while standby.
    pub ha_role: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// High availability: the fencing epoch this daemon holds (0 when it holds none).
    pub ha_epoch: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// High availability: times this daemon became active.
    pub ha_takeovers: Counter<u64, AtomicU64>,
    /// Automatic answers not sent: their number was over `auto_answers_per_sender`.
    pub sms_answers_throttled: Family<InstanceLabels, Counter>,
    /// Timers whose handler failed too often: moved to the dead-letter state.
    pub timers_dead: Family<TimerKindLabels, Counter>,
    /// The event streams: open, refused, ended, events delivered, audience reads.
    pub events: crate::events::EventMetrics,
    /// Statements run on the readers' pool (not the writer's connection): what a
    /// request or an event costs the database in reads.
    pub db_reader_statements: Counter<u64, AtomicU64>,
    /// Each gateway plugin's health at the last poll: 2 ok, 1 degraded, 0 down.
    pub gateway_health: Family<GatewayHealthLabels, Gauge>,
}

impl Metrics {
    /// A fresh set of metrics, all zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("caremsg");
        let http_responses = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_responses",
            "HTTP responses by method and status class",
            http_responses.clone(),
        );
        let http_in_flight = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "http_requests_in_flight",
            "HTTP requests being handled now",
            http_in_flight.clone(),
        );
        let writer_batch_units = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "writer_batch_units",
            "Write units per group-committed transaction",
            writer_batch_units.clone(),
        );
        let writer_commit_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "writer_commit_seconds",
            "Seconds from the start of a write batch to its commit",
            writer_commit_seconds.clone(),
        );
        let writer_units = Counter::default();
        registry.register(
            "writer_units",
            "Write units handled by the writer",
            writer_units.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads by outcome",
            reloads.clone(),
        );
        let writer_heartbeat_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "writer_heartbeat_seconds",
            "Seconds a watchdog heartbeat took through the writer's queue and commit",
            writer_heartbeat_seconds.clone(),
        );
        let http_connections_closed = Family::<CloseLabels, Counter>::default();
        registry.register(
            "http_connections_closed",
            "Client connections the server closed, by the bound that closed them (a timeout, or making room past the connection cap)",
            http_connections_closed.clone(),
        );
        let watchdog_stalls = Counter::default();
        registry.register(
            "watchdog_stalls",
            "Times the systemd watchdog ping was withheld because the writer made no progress",
            watchdog_stalls.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register(
            "build_info",
            "The running caremsgd version (the value is always 1)",
            build_info.clone(),
        );
        let messages_stored = Counter::default();
        registry.register(
            "messages_stored",
            "Conversation messages stored",
            messages_stored.clone(),
        );
        let gateway_deliveries = Family::<GatewayLabels, Counter>::default();
        registry.register(
            "gateway_deliveries",
            "Outbox deliveries by gateway instance and outcome",
            gateway_deliveries.clone(),
        );
        let gateway_inbound = Family::<GatewayLabels, Counter>::default();
        registry.register(
            "gateway_inbound_events",
            "Inbound gateway events by instance and outcome",
            gateway_inbound.clone(),
        );
        let gateway_send_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 18));
        registry.register(
            "gateway_send_seconds",
            "Seconds one plugin send took, waiting for a concurrency permit included",
            gateway_send_seconds.clone(),
        );
        let outbox_depth = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "outbox_depth",
            "Deliveries queued in the outbox",
            outbox_depth.clone(),
        );
        let deliveries_reconcile = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "deliveries_reconcile",
            "Deliveries whose outcome is unknown after a crash, waiting for an operator",
            deliveries_reconcile.clone(),
        );
        let outbox_oldest_seconds = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "outbox_oldest_seconds",
            "Age of the oldest queued delivery in seconds",
            outbox_oldest_seconds.clone(),
        );
        let actors_live = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "actors_live",
            "Conversation actors alive",
            actors_live.clone(),
        );
        let actors_unloaded = Counter::default();
        registry.register(
            "actors_unloaded",
            "Conversation actors unloaded early to stay within conversations.max_live",
            actors_unloaded.clone(),
        );
        let timers_due = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "timers_due",
            "Durable timers due and not yet fired",
            timers_due.clone(),
        );
        let notifications = Family::<NotificationLabels, Counter>::default();
        registry.register(
            "notifications",
            "Staff notifications created, by kind and channel",
            notifications.clone(),
        );
        let rate_limit_waits = Family::<RateLimitLabels, Counter>::default();
        registry.register(
            "rate_limit_waits",
            "Outbound sends held back by a gateway rate limit, by gateway and limit",
            rate_limit_waits.clone(),
        );
        let webhook_rejects = Family::<WebhookRejectLabels, Counter>::default();
        registry.register(
            "webhook_rejects",
            "Provider webhook requests the gateway plugin refused, by gateway and status",
            webhook_rejects.clone(),
        );
        let ha_role = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "ha_role",
            "1 while this daemon is the active one, 0 while standby",
            ha_role.clone(),
        );
        let ha_epoch = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "ha_epoch",
            "The fencing epoch this daemon holds (0: none)",
            ha_epoch.clone(),
        );
        let ha_takeovers = Counter::default();
        registry.register(
            "ha_takeovers",
            "Times this daemon became the active one",
            ha_takeovers.clone(),
        );
        let sms_answers_throttled = Family::<InstanceLabels, Counter>::default();
        registry.register(
            "sms_answers_throttled",
            "Automatic answers not sent because their number was over the automatic-answer limit",
            sms_answers_throttled.clone(),
        );
        let timers_dead = Family::<TimerKindLabels, Counter>::default();
        registry.register(
            "timers_dead",
            "Timers moved to the dead-letter state after their handler failed too often",
            timers_dead.clone(),
        );
        let events = crate::events::EventMetrics::default();
        registry.register(
            "event_streams",
            "Server-sent event streams open now, by kind (staff, portal)",
            events.streams.clone(),
        );
        registry.register(
            "event_streams_refused",
            "Event streams refused at a cap, by reason (per_subscriber, total)",
            events.refused.clone(),
        );
        registry.register(
            "event_streams_ended",
            "Event streams the daemon ended, by reason",
            events.ended.clone(),
        );
        registry.register(
            "events_delivered",
            "Events delivered to event streams (put into their channels or written directly)",
            events.delivered.clone(),
        );
        registry.register(
            "events_written_directly",
            "Events the publisher wrote to a quiet event stream's socket itself",
            events.written_directly.clone(),
        );
        registry.register(
            "event_audience_reads",
            "Database reads computing the audience of an event",
            events.audience_reads.clone(),
        );
        let db_reader_statements = Counter::<u64, AtomicU64>::default();
        registry.register(
            "db_reader_statements",
            "Statements run on the readers' connection pool",
            db_reader_statements.clone(),
        );
        let gateway_health = Family::<GatewayHealthLabels, Gauge>::default();
        registry.register(
            "gateway_health",
            "Gateway plugin health at the last poll: 2 ok, 1 degraded, 0 down",
            gateway_health.clone(),
        );
        Self {
            ha_role,
            ha_epoch,
            ha_takeovers,
            gateway_health,
            sms_answers_throttled,
            timers_dead,
            events,
            db_reader_statements,
            notifications,
            rate_limit_waits,
            webhook_rejects,
            outbox_depth,
            deliveries_reconcile,
            outbox_oldest_seconds,
            actors_live,
            actors_unloaded,
            timers_due,
            gateway_deliveries,
            gateway_inbound,
            gateway_send_seconds,
            messages_stored,
            registry,
            http_responses,
            http_in_flight,
            http_connections_closed,
            writer_batch_units,
            writer_commit_seconds,
            writer_units,
            reloads,
            writer_heartbeat_seconds,
            watchdog_stalls,
            build_info,
        }
    }

    /// Records one committed batch.
    pub fn writer_batch(&self, units: usize, took: Duration) {
        self.writer_batch_units.observe(units as f64);
        self.writer_commit_seconds.observe(took.as_secs_f64());
        self.writer_units.inc_by(units as u64);
    }

    /// Records one reload.
    pub fn reload(&self, outcome: &str) {
        self.reloads
            .get_or_create(&ReloadLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts `n` deliveries of `gateway` that ended a pass with `outcome`.
    pub fn gateway_delivery(&self, gateway: &str, outcome: &str, n: u64) {
        self.gateway_deliveries
            .get_or_create(&GatewayLabels {
                gateway: gateway.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc_by(n);
    }

    /// Counts one inbound event of `gateway` with `outcome`.
    pub fn gateway_inbound(&self, gateway: &str, outcome: &str) {
        self.gateway_inbound
            .get_or_create(&GatewayLabels {
                gateway: gateway.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts `n` notifications of `kind` created for `channel`.
    pub fn notification(&self, kind: &str, channel: &str, n: u64) {
        self.notifications
            .get_or_create(&NotificationLabels {
                kind: kind.to_owned(),
                channel: channel.to_owned(),
            })
            .inc_by(n);
    }

    /// Counts one outbound send of `gateway` held back by its `limit`.
    pub fn rate_limit_wait(&self, gateway: &str, limit: &str) {
        self.rate_limit_waits
            .get_or_create(&RateLimitLabels {
                gateway: gateway.to_owned(),
                limit: limit.to_owned(),
            })
            .inc();
    }

    /// Counts one automatic answer of `gateway` not sent (over the answer limit).
    pub fn answer_throttled(&self, gateway: &str) {
        self.sms_answers_throttled
            .get_or_create(&InstanceLabels {
                gateway: gateway.to_owned(),
            })
            .inc();
    }

    /// Counts one timer of `kind` moved to the dead-letter state.
    pub fn timer_dead(&self, kind: &str) {
        self.timers_dead
            .get_or_create(&TimerKindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Counts one webhook request of `gateway` its plugin refused with `status`.
    pub fn webhook_reject(&self, gateway: &str, status: u16) {
        self.webhook_rejects
            .get_or_create(&WebhookRejectLabels {
                gateway: gateway.to_owned(),
                status: status.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %err, "Metrics could not be encoded.");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
