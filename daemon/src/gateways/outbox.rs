//! The outbox dispatcher: sends stored deliveries through their gateway instance.
//!
//! One [`Dispatcher`] per configured instance, plus one for portal deliveries that
//! name no gateway. Each runs its own task, so a slow or paused provider never holds
//! up another, and each instance keeps its own limits, concurrency and pause. A
//! *pass* ([`run_once`]) does, for the rows of its instance that are due
//! (`status = queued AND next_attempt_at <= now`, oldest first, at most [`BATCH`]):
//!
//! 1. **Limits.** Takes the instance's tokens (SMS segments, counted with the SDK's
//!    `sms::segments`; one per message for other kinds) and the recipient's. The
//!    first row the instance limit holds back ends the scan: it and the rows after
//!    it stay queued, untouched, for the next pass. A row its recipient's limit holds
//!    back is deferred (`next_attempt_at` moves to when the recipient has a token).
//!    Tokens are taken before the claim, so a row then refused for consent has used
//!    its tokens: the limits err on the side of sending less, never more.
//! 2. **Claim, with consent, in one write unit** through the writer, so the claim is
//!    committed before any plugin call and the consent read is the committed state
//!    at that instant: rows whose number opted out of the practice's texts
//!    (`sms_consent`), whose patient opted out or was deleted, whose practice was
//!    deactivated (even the opt-out confirmation), or — for conversation
//!    messages — whose patient's SMS status is no longer `enabled` become `refused`
//!    (with the reason in `error_code`) and are never handed to the plugin; the rest
//!    become `sending` with `claimed_at` and one more attempt.
//! 3. **Send**, each claimed row concurrently (bounded by the instance's
//!    concurrency) with the delivery id as the idempotency key.
//! 4. **Record**: `sent` with the provider id; a retryable error back to `queued` at
//!    a back-off instant ([`super::retry`]: exponential, full jitter, never before
//!    `retry_after`, spread 2 ms apart) until [`MAX_RETRY_AGE`], then `failed`; a
//!    permanent error `failed` with the provider's code and reason; "unsubscribed"
//!    `failed` plus the carrier opt-out ([`super::consent`]). A provider's push-back
//!    (a `retry_after`, or code 429 / 20429) pauses the whole instance until then:
//!    claimed rows not yet handed to the plugin go back to `queued` without an
//!    attempt counted. A plugin panic fails the delivery (`plugin_panicked`): its
//!    outcome is unknown, so it is not sent again blindly.
//!
//! **The opt-out confirmation exemption.** The one text allowed to an opted-out
//! number is the confirmation of its opt-out. The SMS authentication work marks that
//! delivery `purpose = sms_auth` and `subject = "opt_out_confirmation"`
//! ([`OPT_OUT_CONFIRMATION_SUBJECT`]); no other delivery to an opted-out number or
//! patient is ever claimed. (The subject of an SMS is never handed to the plugin.)
//!
//! **After a crash.** Rows found `sending` at start ([`reconcile_interrupted`]) may
//! or may not have reached the provider. They become `reconcile` with the reason in
//! `error_reason`, unless their instance deduplicates by idempotency key (none can
//! declare that in ABI 1.0).
//!
//! **Waking.** A dispatcher passes when poked ([`crate::gateways::Gateways::wake`],
//! which whoever commits new deliveries calls; the gateways also poke on every
//! message event), when its next retry falls due, when a limit or pause ends, and
//! every [`POLL_INTERVAL`] regardless. Passes of one dispatcher never overlap, so a
//! test that calls [`run_once`] after committing a delivery sees it handled when the
//! call returns, without sleeping.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use caremsg_config::GatewayKind;
use caremsg_entities::{
    DeliveryChannel, DeliveryPurpose, DeliveryStatus, SmsStatus, delivery, message, patient,
    practice, sms_consent,
};
use caremsg_plugin_host::{CallError, Outbound, SendOutcome};
use chrono::{DateTime, TimeDelta, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sea_orm::sea_query::{
    Alias, CaseStatement, Condition, Expr, ExprTrait, Func, IntoCondition, Query, UpdateStatement,
};
use sea_orm::{ColumnTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::instance::GatewayInstance;
use super::limits::Check;
use super::retry::{self, MAX_RETRY_AGE, Spreader};
use crate::state::Shared;
use crate::writer::{Expect, WriteError, WriteUnit};

/// The `subject` that marks the single opt-out confirmation text (with `purpose =
/// sms_auth`), the one delivery claimed for an opted-out number.
pub const OPT_OUT_CONFIRMATION_SUBJECT: &str = "opt_out_confirmation";

/// Most rows one pass claims.
pub const BATCH: u64 = 512;

/// A dispatcher passes at least this often, poked or not.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The pause after a push-back (429) that named no `retry_after`.
pub const DEFAULT_PUSHBACK: Duration = Duration::from_secs(5);

/// Most rows one `sent` statement records.
const RESULT_CHUNK: usize = 500;

/// How often keyed limiters forget recipients and senders with full buckets.
const FORGET_IDLE_KEYS_EVERY: Duration = Duration::from_secs(60);

/// Shortest wait between passes of a dispatcher that found nothing it could do.
const MIN_IDLE_WAIT: Duration = Duration::from_millis(5);

/// Why a pass failed. Nothing here carries PHI.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// No dispatcher has this name.
    #[error("no gateway instance is named {0}")]
    UnknownGateway(String),
    /// Reading deliveries failed.
    #[error("reading deliveries failed: {0}")]
    Read(#[from] DbErr),
    /// Committing a claim failed; nothing was sent.
    #[error("committing the claim failed: {0}")]
    Claim(#[from] WriteError),
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Rows claimed (`sending`) and handed to the plugin or the portal.
    pub claimed: usize,
    /// Recorded `sent`.
    pub sent: usize,
    /// Back to `queued` for a retry.
    pub retried: usize,
    /// Recorded `failed` (permanent errors, unsubscribed, panics, expired retries).
    pub failed: usize,
    /// Recorded `refused` at claim time (consent).
    pub refused: usize,
    /// Left `queued` for later: held back by a recipient's limit, or claimed but not
    /// handed to the plugin because the provider pushed back meanwhile.
    pub deferred: usize,
    /// The instance's limit held rows back; it has tokens again after this long.
    pub limited_for: Option<Duration>,
    /// The provider pushed back; nothing is sent until then.
    pub paused_until: Option<DateTime<Utc>>,
    /// The pass claimed a full batch: more rows may be due.
    pub more: bool,
}

impl PassReport {
    fn add(&mut self, other: &PassReport) {
        self.claimed += other.claimed;
        self.sent += other.sent;
        self.retried += other.retried;
        self.failed += other.failed;
        self.refused += other.refused;
        self.deferred += other.deferred;
        self.limited_for = self.limited_for.or(other.limited_for);
        self.paused_until = self.paused_until.or(other.paused_until);
        self.more = other.more;
    }
}

/// The dispatcher of one gateway instance.
pub struct Dispatcher {
    /// The instance it sends through; `None`: portal deliveries that name no
    /// gateway, which the portal API serves, so they are only marked `sent`.
    gateway: Option<Arc<GatewayInstance>>,
    /// Serialises passes (the background task and [`run_once`]).
    pass: tokio::sync::Mutex<()>,
    /// Poked when deliveries may be due.
    wake: Notify,
    /// Hands out this instance's retry instants, 2 ms apart.
    spread: Mutex<Spreader>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("gateway", &self.name())
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    pub(crate) fn new(gateway: Option<Arc<GatewayInstance>>) -> Self {
        Self {
            gateway,
            pass: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            spread: Mutex::new(Spreader::default()),
        }
    }

    /// The instance's name; `None` for the portal dispatcher.
    pub fn name(&self) -> Option<&str> {
        self.gateway.as_deref().map(GatewayInstance::name)
    }

    /// Asks for a pass soon (a poke while a pass runs gives one more pass after it).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn retry_at(&self, now: DateTime<Utc>, after: Duration, attempt: i32) -> DateTime<Utc> {
        self.spread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pick(now, after, retry::window(attempt), &mut rand::rng())
    }
}

/// One pass of the dispatcher of instance `name`; returns when every row it claimed
/// is recorded.
pub async fn run_once(state: &Shared, name: &str) -> Result<PassReport, DispatchError> {
    let dispatcher = state
        .gateways
        .dispatcher(Some(name))
        .ok_or_else(|| DispatchError::UnknownGateway(name.to_owned()))?;
    pass(state, &dispatcher).await
}

/// One pass of the portal dispatcher (portal deliveries that name no gateway).
pub async fn run_portal_once(state: &Shared) -> Result<PassReport, DispatchError> {
    let dispatcher = state
        .gateways
        .dispatcher(None)
        .ok_or_else(|| DispatchError::UnknownGateway("(portal)".to_owned()))?;
    pass(state, &dispatcher).await
}

/// Passes of instance `name` until one finds no full batch; the sum of their reports.
pub async fn drain(state: &Shared, name: &str) -> Result<PassReport, DispatchError> {
    let mut total = PassReport::default();
    loop {
        let report = run_once(state, name).await?;
        total.add(&report);
        if !report.more {
            return Ok(total);
        }
    }
}

pub(crate) async fn pass(
    state: &Shared,
    dispatcher: &Dispatcher,
) -> Result<PassReport, DispatchError> {
    let _one_at_a_time = dispatcher.pass.lock().await;
    match &dispatcher.gateway {
        None => portal_pass(state).await,
        Some(gateway) => plugin_pass(state, dispatcher, gateway).await,
    }
}

/// The background task of one dispatcher; ends when `stop` is cancelled, after the
/// pass in progress has recorded what it sent.
pub(crate) async fn run(state: Shared, dispatcher: Arc<Dispatcher>, stop: CancellationToken) {
    let mut forgot_idle_keys = Instant::now();
    while !stop.is_cancelled() {
        let wait = match pass(&state, &dispatcher).await {
            Ok(report) if report.more => {
                tokio::task::yield_now().await;
                continue;
            }
            Ok(report) => next_wait(&state, &dispatcher, &report).await,
            Err(error) => {
                tracing::error!(gateway = ?dispatcher.name(), %error, "An outbox pass failed; it is tried again shortly.");
                POLL_INTERVAL
            }
        };
        if forgot_idle_keys.elapsed() >= FORGET_IDLE_KEYS_EVERY
            && let Some(gateway) = &dispatcher.gateway
        {
            gateway.limits().forget_idle_keys();
            forgot_idle_keys = Instant::now();
        }
        tokio::select! {
            () = dispatcher.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => break,
        }
    }
}

/// How long an idle dispatcher may wait: until its next retry falls due, its limit
/// or pause ends, or [`POLL_INTERVAL`], whichever is first.
async fn next_wait(state: &Shared, dispatcher: &Dispatcher, report: &PassReport) -> Duration {
    let now = state.clock.now();
    let mut wait = POLL_INTERVAL;
    if let Some(limited) = report.limited_for {
        wait = wait.min(limited);
    }
    if let Some(until) = report.paused_until {
        wait = wait.min((until - now).to_std().unwrap_or_default());
    }
    if let Some(name) = dispatcher.name() {
        let next: Result<Option<DateTime<Utc>>, DbErr> = delivery::Entity::find()
            .select_only()
            .column_as(delivery::Column::NextAttemptAt.min(), "next")
            .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
            .filter(delivery::Column::Gateway.eq(name))
            .into_tuple()
            .one(&state.db)
            .await
            .map(Option::flatten);
        if let Ok(Some(next)) = next {
            wait = wait.min((next - now).to_std().unwrap_or_default());
        }
    }
    wait.max(MIN_IDLE_WAIT)
}

/// Marks portal deliveries that name no gateway `sent`: the portal API serves them.
async fn portal_pass(state: &Shared) -> Result<PassReport, DispatchError> {
    let now = state.clock.now();
    let ids: Vec<String> = delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
        .filter(delivery::Column::Channel.eq(DeliveryChannel::Portal))
        .filter(delivery::Column::Gateway.is_null())
        .filter(delivery::Column::NextAttemptAt.lte(now))
        .order_by_asc(delivery::Column::NextAttemptAt)
        .limit(BATCH)
        .into_tuple()
        .all(&state.db)
        .await?;
    let mut report = PassReport {
        more: ids.len() as u64 == BATCH,
        ..PassReport::default()
    };
    if ids.is_empty() {
        return Ok(report);
    }
    let statement = delivery::Entity::update_many()
        .col_expr(delivery::Column::Status, Expr::value(DeliveryStatus::Sent))
        .col_expr(
            delivery::Column::Attempts,
            Expr::col(delivery::Column::Attempts).add(1),
        )
        .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
        .filter(delivery::Column::Id.is_in(ids.clone()))
        .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
        .into_query();
    state
        .writer
        .write(WriteUnit::new().exec(statement, Expect::Any, "portal deliveries sent"))
        .await?;
    report.claimed = ids.len();
    report.sent = ids.len();
    state
        .metrics
        .gateway_delivery("(portal)", "sent", ids.len() as u64);
    Ok(report)
}

/// What became of one claimed delivery.
#[derive(Debug)]
enum Outcome {
    /// The provider took it.
    Sent { provider_id: Option<String> },
    /// Try again at `at`.
    Retry {
        at: DateTime<Utc>,
        code: Option<String>,
        reason: String,
    },
    /// Given up.
    Failed { code: String, reason: String },
    /// The recipient unsubscribed at the provider.
    Unsubscribed { reason: String },
    /// Never handed to the plugin (paused, or the instance was being replaced).
    NotAttempted { at: DateTime<Utc> },
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Self::Sent { .. } => "sent",
            Self::Retry { .. } => "retry",
            Self::Failed { .. } => "failed",
            Self::Unsubscribed { .. } => "unsubscribed",
            Self::NotAttempted { .. } => "not_attempted",
        }
    }
}

async fn plugin_pass(
    state: &Shared,
    dispatcher: &Dispatcher,
    gateway: &Arc<GatewayInstance>,
) -> Result<PassReport, DispatchError> {
    let now = state.clock.now();
    let mut report = PassReport::default();
    if let Some(until) = gateway.paused_until(now) {
        report.paused_until = Some(until);
        return Ok(report);
    }
    let candidates = delivery::Entity::find()
        .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
        .filter(delivery::Column::Gateway.eq(gateway.name()))
        .filter(delivery::Column::NextAttemptAt.lte(now))
        // The `(status, next_attempt_at)` index gives this order, so the scan stops
        // after the batch; a tie-breaker would sort every due row on each pass.
        .order_by_asc(delivery::Column::NextAttemptAt)
        .limit(BATCH)
        .all(&state.db)
        .await?;
    if candidates.is_empty() {
        return Ok(report);
    }
    let full = candidates.len() as u64 == BATCH;

    // 1. Limits.
    let limits = gateway.limits();
    let sms = gateway.kind() == GatewayKind::Sms;
    let mut group = Vec::with_capacity(candidates.len());
    let mut deferred = Vec::new();
    for row in candidates {
        let cells = if sms {
            let segments = caremsg_plugin_sdk::sms::segments(row.body.as_deref().unwrap_or(""));
            u32::try_from(segments.count).unwrap_or(u32::MAX)
        } else {
            1
        };
        if let Check::Wait(wait) = limits.check_instance(cells) {
            state.metrics.rate_limit_wait(gateway.name(), "instance");
            report.limited_for = Some(wait);
            break;
        }
        if let Some(recipient) = row.recipient.as_deref()
            && let Check::Wait(wait) = limits.check_recipient(recipient)
        {
            state.metrics.rate_limit_wait(gateway.name(), "recipient");
            deferred.push((row.id, now + to_delta(wait)));
            continue;
        }
        group.push(row);
    }
    drop(limits);

    // 2. Claim, with consent, in one unit.
    let ids: Vec<String> = group.iter().map(|row| row.id.clone()).collect();
    let mut unit = WriteUnit::new();
    for (id, at) in &deferred {
        unit = unit.exec(
            delivery::Entity::update_many()
                .col_expr(delivery::Column::NextAttemptAt, Expr::value(*at))
                .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
                .filter(delivery::Column::Id.eq(id.as_str()))
                .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
                .into_query(),
            Expect::Any,
            "delivery deferred by the recipient's limit",
        );
    }
    report.deferred = deferred.len();
    if !ids.is_empty() {
        unit = unit.merge(claim_unit(&ids, now));
    }
    state.writer.write(unit).await?;
    if ids.is_empty() {
        return Ok(report);
    }
    let after: HashMap<String, DeliveryStatus> = delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .column(delivery::Column::Status)
        .filter(delivery::Column::Id.is_in(ids))
        .into_tuple::<(String, DeliveryStatus)>()
        .all(&state.db)
        .await?
        .into_iter()
        .collect();
    let mut claimed = Vec::with_capacity(group.len());
    for row in group {
        match after.get(&row.id) {
            Some(DeliveryStatus::Sending) => claimed.push(row),
            Some(DeliveryStatus::Refused) => report.refused += 1,
            _ => {}
        }
    }
    if report.refused > 0 {
        tracing::info!(gateway = %gateway.name(), refused = report.refused, "Deliveries were refused at claim time: the recipient may not be texted.");
        state
            .metrics
            .gateway_delivery(gateway.name(), "refused", report.refused as u64);
    }
    report.claimed = claimed.len();
    report.more = full && report.limited_for.is_none();
    if claimed.is_empty() {
        return Ok(report);
    }

    // 3. Send, and 4. record each outcome as its send completes (the writer commits
    // the records of sends that complete together in one batch): a crash mid-pass
    // leaves `sending` only the rows whose outcome is truly unknown.
    let bodies = message_bodies(state, &claimed).await?;
    let mut sends = FuturesUnordered::new();
    for row in claimed {
        let body = row
            .body
            .clone()
            .or_else(|| {
                row.message_id
                    .as_ref()
                    .and_then(|id| bodies.get(id).cloned())
            })
            .unwrap_or_default();
        sends.push(async move {
            let (row, outcome) = send_one(state, dispatcher, gateway, row, body).await;
            let label = outcome.label();
            record(
                state,
                gateway.name(),
                vec![(row, outcome)],
                state.clock.now(),
            )
            .await;
            label
        });
    }
    while let Some(label) = sends.next().await {
        match label {
            "sent" => report.sent += 1,
            "retry" => report.retried += 1,
            "not_attempted" => report.deferred += 1,
            _ => report.failed += 1,
        }
    }
    drop(sends);
    if let Some(until) = gateway.paused_until(now) {
        report.paused_until = Some(until);
        report.more = false;
    }
    Ok(report)
}

/// The bodies of the conversation messages of claimed rows that carry none.
async fn message_bodies(
    state: &Shared,
    rows: &[delivery::Model],
) -> Result<HashMap<String, String>, DbErr> {
    let ids: Vec<String> = rows
        .iter()
        .filter(|row| row.body.is_none())
        .filter_map(|row| row.message_id.clone())
        .collect();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(message::Entity::find()
        .select_only()
        .column(message::Column::Id)
        .column(message::Column::Body)
        .filter(message::Column::Id.is_in(ids))
        .into_tuple::<(String, String)>()
        .all(&state.db)
        .await?
        .into_iter()
        .collect())
}

/// Rows of `ids` still queued: those the recipient may not get become `refused`, the
/// rest `sending` with one more attempt. One unit, so the consent read and the claim
/// see the same committed state.
fn claim_unit(ids: &[String], now: DateTime<Utc>) -> WriteUnit {
    let sms = || delivery::Column::Channel.eq(DeliveryChannel::Sms);
    let refusals = [
        (
            Condition::all()
                .add(sms())
                .add(not_exempt())
                .add(number_opted_out()),
            "number_opted_out",
            "The number opted out of this practice's texts.",
        ),
        (
            Condition::all()
                .add(sms())
                .add(not_exempt())
                .add(patient_where(
                    patient::Column::SmsStatus.eq(SmsStatus::OptedOut),
                )),
            "patient_opted_out",
            "The patient opted out of texts.",
        ),
        (
            Condition::all()
                .add(not_exempt())
                .add(patient_where(patient::Column::Active.eq(false))),
            "patient_inactive",
            "The patient was removed; nothing more is sent to them.",
        ),
        (
            Condition::all().add(practice_inactive()),
            "practice_inactive",
            "The practice was deactivated; nothing more is sent for it.",
        ),
        (
            Condition::all()
                .add(sms())
                .add(delivery::Column::Purpose.eq(DeliveryPurpose::Message))
                .add(patient_where(
                    patient::Column::SmsStatus.ne(SmsStatus::Enabled),
                )),
            "sms_not_enabled",
            "The patient's SMS status is no longer enabled.",
        ),
        (
            // Queued for a number the patient no longer has (it changed and was
            // confirmed again while this text waited, e.g. through a provider outage):
            // that number may be someone else's now.
            Condition::all()
                .add(sms())
                .add(delivery::Column::Purpose.eq(DeliveryPurpose::Message))
                .add(patient_where(
                    Condition::any()
                        .add(patient::Column::MobilePhone.is_null())
                        .add(
                            Expr::col((patient::Entity, patient::Column::MobilePhone))
                                .ne(Expr::col((delivery::Entity, delivery::Column::Recipient))),
                        ),
                )),
            "number_changed",
            "The patient's mobile number changed after this text was queued.",
        ),
    ];
    let mut unit = WriteUnit::new();
    for (condition, code, reason) in refusals {
        unit = unit.exec(
            delivery::Entity::update_many()
                .col_expr(
                    delivery::Column::Status,
                    Expr::value(DeliveryStatus::Refused),
                )
                .col_expr(delivery::Column::ErrorCode, Expr::value(code))
                .col_expr(delivery::Column::ErrorReason, Expr::value(reason))
                .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
                .filter(delivery::Column::Id.is_in(ids.iter().cloned()))
                .filter(still(DeliveryStatus::Queued))
                .filter(condition)
                .into_query(),
            Expect::Any,
            "deliveries refused at claim time",
        );
    }
    unit.exec(
        delivery::Entity::update_many()
            .col_expr(
                delivery::Column::Status,
                Expr::value(DeliveryStatus::Sending),
            )
            .col_expr(delivery::Column::ClaimedAt, Expr::value(now))
            .col_expr(Alias::new("claim_epoch"), crate::ha::claim_epoch())
            .col_expr(
                delivery::Column::Attempts,
                Expr::col(delivery::Column::Attempts).add(1),
            )
            .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
            .filter(delivery::Column::Id.is_in(ids.iter().cloned()))
            .filter(still(DeliveryStatus::Queued))
            .into_query(),
        Expect::Any,
        "deliveries claimed",
    )
}

/// The guard "the row is still `status`" of a statement that names its rows by id.
/// Compared through a `CAST`, so that SQLite's planner (which has no statistics)
/// looks the rows up by their ids instead of walking the `(status, next_attempt_at)`
/// index through every queued row; PostgreSQL plans both forms alike.
fn still(status: DeliveryStatus) -> Expr {
    Expr::expr(Func::cast_as(
        Expr::col((delivery::Entity, delivery::Column::Status)),
        Alias::new("TEXT"),
    ))
    .eq(status.as_str())
}

/// Not the opt-out confirmation (NULL-safe: a NULL subject is not exempt).
fn not_exempt() -> Condition {
    Condition::any()
        .add(delivery::Column::Purpose.ne(DeliveryPurpose::SmsAuth))
        .add(delivery::Column::Subject.is_null())
        .add(delivery::Column::Subject.ne(OPT_OUT_CONFIRMATION_SUBJECT))
}

/// The delivery's number opted out of its practice's texts.
fn number_opted_out() -> Expr {
    Expr::exists(
        Query::select()
            .expr(Expr::val(1))
            .from(sms_consent::Entity)
            .and_where(
                Expr::col((sms_consent::Entity, sms_consent::Column::PracticeId))
                    .equals((delivery::Entity, delivery::Column::PracticeId)),
            )
            .and_where(
                Expr::col((sms_consent::Entity, sms_consent::Column::Phone))
                    .equals((delivery::Entity, delivery::Column::Recipient)),
            )
            .and_where(sms_consent::Column::OptedOut.eq(true))
            .to_owned(),
    )
}

/// The delivery's practice was deactivated (nothing is exempt: not even an opt-out
/// confirmation leaves for a deactivated practice).
fn practice_inactive() -> Expr {
    Expr::exists(
        Query::select()
            .expr(Expr::val(1))
            .from(practice::Entity)
            .and_where(
                Expr::col((practice::Entity, practice::Column::Id))
                    .equals((delivery::Entity, delivery::Column::PracticeId)),
            )
            .and_where(practice::Column::Active.eq(false))
            .to_owned(),
    )
}

/// The delivery's patient meets `condition`.
fn patient_where(condition: impl IntoCondition) -> Expr {
    Expr::exists(
        Query::select()
            .expr(Expr::val(1))
            .from(patient::Entity)
            .and_where(
                Expr::col((patient::Entity, patient::Column::Id))
                    .equals((delivery::Entity, delivery::Column::PatientId)),
            )
            .cond_where(condition)
            .to_owned(),
    )
}

/// Hands one claimed row to the plugin and says what became of it.
async fn send_one(
    state: &Shared,
    dispatcher: &Dispatcher,
    gateway: &Arc<GatewayInstance>,
    row: delivery::Model,
    body: String,
) -> (delivery::Model, Outcome) {
    let outbound = Outbound {
        delivery_id: row.id.clone(),
        to: row.recipient.clone().unwrap_or_default(),
        from: row.from_number.clone().unwrap_or_default(),
        body,
        idempotency_key: row.id.clone(),
        subject: if row.channel == DeliveryChannel::Email {
            row.subject.clone()
        } else {
            None
        },
        attempt: std::cmp::max(u32::try_from(row.attempts).unwrap_or(1), 1),
    };
    let started = Instant::now();
    let (clock, paused) = (state.clock.clone(), gateway.clone());
    let attempted = gateway
        .call_if(
            || gateway.paused_until(state.clock.now()).is_none(),
            move |instance| {
                let result = instance.send(&outbound).map(retry::clamp_retry_after);
                // Paused before the concurrency permit is released, so no send
                // waiting for it goes out after the provider pushed back.
                if let Ok(SendOutcome::Retryable { after, code, .. }) = &result
                    && is_pushback(*after, code.as_deref())
                {
                    let pause = after.unwrap_or(DEFAULT_PUSHBACK);
                    paused.pause(clock.now() + to_delta(pause));
                    tracing::warn!(gateway = %paused.name(), pause_ms = pause.as_millis() as u64, "The provider pushed back; sending through this gateway is paused.");
                }
                result
            },
        )
        .await;
    let now = state.clock.now();
    let Some(result) = attempted else {
        let until = gateway.paused_until(now).unwrap_or(now);
        let wait = (until - now).to_std().unwrap_or_default();
        let at = dispatcher.retry_at(now, wait, row.attempts);
        return (row, Outcome::NotAttempted { at });
    };
    state
        .metrics
        .gateway_send_seconds
        .observe(started.elapsed().as_secs_f64());
    let outcome = match result {
        Ok(SendOutcome::Sent { provider_id }) => Outcome::Sent {
            provider_id: Some(provider_id).filter(|id| !id.is_empty()),
        },
        Ok(SendOutcome::Retryable {
            after,
            code,
            reason,
        }) => {
            let at = dispatcher.retry_at(now, after.unwrap_or_default(), row.attempts);
            let expires = row.created_at + to_delta(MAX_RETRY_AGE);
            if at > expires {
                Outcome::Failed {
                    code: code.unwrap_or_else(|| "retry_expired".to_owned()),
                    reason: format!(
                        "{reason} Retries stopped: the delivery is older than {} hours.",
                        MAX_RETRY_AGE.as_secs() / 3600
                    ),
                }
            } else {
                Outcome::Retry { at, code, reason }
            }
        }
        Ok(SendOutcome::Permanent { code, reason }) => Outcome::Failed { code, reason },
        Ok(SendOutcome::Unsubscribed { reason }) => Outcome::Unsubscribed { reason },
        Err(CallError::Stopped) => Outcome::NotAttempted { at: now },
        Err(CallError::Panicked { .. }) => Outcome::Failed {
            code: "plugin_panicked".to_owned(),
            reason: "The gateway plugin panicked while sending (contained). Whether the provider \
                     took the message is unknown, so it is not sent again."
                .to_owned(),
        },
        Err(CallError::InvalidInput { .. }) => Outcome::Failed {
            code: "invalid_input".to_owned(),
            reason: "The gateway plugin found this delivery malformed.".to_owned(),
        },
        Err(error @ CallError::BadOutput { .. }) => Outcome::Failed {
            code: "plugin_bad_output".to_owned(),
            reason: format!("{error}. Whether the provider took the message is unknown."),
        },
    };
    match &outcome {
        Outcome::Sent { .. } | Outcome::NotAttempted { .. } => {}
        Outcome::Retry { code, .. } => {
            tracing::info!(gateway = %gateway.name(), delivery_id = %row.id, attempt = row.attempts, code = code.as_deref().unwrap_or(""), "A delivery failed for now; it will be retried.");
        }
        Outcome::Failed { code, .. } => {
            tracing::warn!(gateway = %gateway.name(), delivery_id = %row.id, attempt = row.attempts, %code, "A delivery failed.");
        }
        Outcome::Unsubscribed { .. } => {
            tracing::warn!(gateway = %gateway.name(), delivery_id = %row.id, "The provider reports that the recipient unsubscribed; the number is opted out.");
        }
    }
    (row, outcome)
}

/// Records outcomes: the `sent` rows in few statements, the rest one statement each,
/// all in one unit. If that unit fails (say a plugin returned a provider id already
/// stored), each row is recorded on its own, so one bad row cannot leave the others
/// `sending`. Then receipts parked for the provider ids now stored are applied
/// ([`super::inbound::apply_parked`]), and the patients of numbers that unsubscribed
/// are told ([`super::consent::follow_up`]).
async fn record(
    state: &Shared,
    gateway: &str,
    outcomes: Vec<(delivery::Model, Outcome)>,
    now: DateTime<Utc>,
) {
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    for (_, outcome) in &outcomes {
        *counts.entry(outcome.label()).or_default() += 1;
    }
    for (label, n) in counts {
        state.metrics.gateway_delivery(gateway, label, n);
    }
    let mut unit = WriteUnit::new();
    let mut sent = Vec::new();
    let mut singles: Vec<(String, WriteUnit)> = Vec::new();
    let mut unsubscribed: Vec<(String, String)> = Vec::new();
    let mut provider_ids: Vec<String> = Vec::new();
    for (row, outcome) in outcomes {
        if let Outcome::Sent {
            provider_id: Some(id),
        } = &outcome
        {
            provider_ids.push(id.clone());
        }
        if let Outcome::Unsubscribed { .. } = &outcome
            && row.channel == DeliveryChannel::Sms
            && let Some(recipient) = &row.recipient
        {
            unsubscribed.push((row.practice_id.clone(), recipient.clone()));
        }
        match outcome {
            Outcome::Sent { provider_id } => sent.push((row.id, provider_id)),
            other => singles.push((row.id.clone(), outcome_unit(&row, &other, now))),
        }
    }
    for chunk in sent.chunks(RESULT_CHUNK) {
        unit = unit.exec(sent_statement(chunk, now), Expect::Any, "deliveries sent");
    }
    for (_, single) in &singles {
        unit = unit.merge(single.clone());
    }
    if let Err(error) = state.writer.write(unit).await {
        tracing::warn!(%gateway, %error, "Recording a pass's outcomes failed; recording each delivery on its own.");
        record_one_by_one(state, gateway, sent, singles, now).await;
    }
    if !provider_ids.is_empty()
        && let Err(error) = super::inbound::apply_parked(state, gateway, &provider_ids).await
    {
        tracing::warn!(%gateway, %error, "Receipts parked for sent deliveries could not be applied yet; they are applied with the next receipt or pruned.");
    }
    for (practice_id, phone) in unsubscribed {
        super::consent::follow_up_logged(state, gateway, &practice_id, &phone).await;
    }
}

/// [`record`]'s fallback: every delivery in a unit of its own.
async fn record_one_by_one(
    state: &Shared,
    gateway: &str,
    sent: Vec<(String, Option<String>)>,
    singles: Vec<(String, WriteUnit)>,
    now: DateTime<Utc>,
) {
    let mut units: Vec<(String, WriteUnit)> = sent
        .into_iter()
        .map(|(id, provider_id)| {
            let chunk = [(id.clone(), provider_id)];
            let unit =
                WriteUnit::new().exec(sent_statement(&chunk, now), Expect::Any, "delivery sent");
            (id, unit)
        })
        .collect();
    units.extend(singles);
    let writes = units.into_iter().map(|(id, unit)| async move {
        let result = state.writer.write(unit).await;
        (id, result)
    });
    for (id, result) in futures::future::join_all(writes).await {
        match result {
            Ok(()) => {}
            Err(WriteError::Conflict(_)) => {
                // The provider id is already stored for another delivery: keep the
                // delivery `sent`, without the id.
                let unit = WriteUnit::new().exec(
                    sent_statement(&[(id.clone(), None)], now),
                    Expect::Any,
                    "delivery sent without its duplicate provider id",
                );
                if let Err(error) = state.writer.write(unit).await {
                    tracing::error!(%gateway, delivery_id = %id, %error, "Recording a delivery failed; it stays `sending` and is reconciled after a restart.");
                } else {
                    tracing::warn!(%gateway, delivery_id = %id, "The plugin returned a provider id already stored for another delivery; the id was not stored.");
                }
            }
            Err(error) => {
                tracing::error!(%gateway, delivery_id = %id, %error, "Recording a delivery failed; it stays `sending` and is reconciled after a restart.");
            }
        }
    }
}

/// `sent` with each row's provider id (a `CASE` over the ids), for rows still `sending`.
fn sent_statement(rows: &[(String, Option<String>)], now: DateTime<Utc>) -> UpdateStatement {
    let mut case = CaseStatement::new();
    for (id, provider_id) in rows {
        case = case.case(
            delivery::Column::Id.eq(id.as_str()),
            Expr::value(provider_id.clone()),
        );
    }
    let case = case.finally(Expr::value(Option::<String>::None));
    delivery::Entity::update_many()
        .col_expr(delivery::Column::Status, Expr::value(DeliveryStatus::Sent))
        .col_expr(delivery::Column::ProviderMessageId, case.into())
        .col_expr(
            delivery::Column::ErrorCode,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            delivery::Column::ErrorReason,
            Expr::value(Option::<String>::None),
        )
        .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
        .filter(delivery::Column::Id.is_in(rows.iter().map(|(id, _)| id.clone())))
        .filter(still(DeliveryStatus::Sending))
        .into_query()
}

/// The writes recording one outcome other than `sent`.
fn outcome_unit(row: &delivery::Model, outcome: &Outcome, now: DateTime<Utc>) -> WriteUnit {
    let update = || {
        let mut update = delivery::Entity::update_many();
        update = update
            .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
            .filter(delivery::Column::Id.eq(row.id.as_str()))
            .filter(delivery::Column::Status.eq(DeliveryStatus::Sending));
        update
    };
    let statement = match outcome {
        Outcome::Sent { provider_id } => {
            return WriteUnit::new().exec(
                sent_statement(&[(row.id.clone(), provider_id.clone())], now),
                Expect::Any,
                "delivery sent",
            );
        }
        Outcome::Retry { at, code, reason } => update()
            .col_expr(
                delivery::Column::Status,
                Expr::value(DeliveryStatus::Queued),
            )
            .col_expr(delivery::Column::NextAttemptAt, Expr::value(*at))
            .col_expr(
                delivery::Column::ClaimedAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .col_expr(delivery::Column::ErrorCode, Expr::value(code.clone()))
            .col_expr(delivery::Column::ErrorReason, Expr::value(reason.as_str()))
            .into_query(),
        Outcome::Failed { code, reason } => update()
            .col_expr(
                delivery::Column::Status,
                Expr::value(DeliveryStatus::Failed),
            )
            .col_expr(delivery::Column::ErrorCode, Expr::value(code.as_str()))
            .col_expr(delivery::Column::ErrorReason, Expr::value(reason.as_str()))
            .into_query(),
        Outcome::Unsubscribed { reason } => update()
            .col_expr(
                delivery::Column::Status,
                Expr::value(DeliveryStatus::Failed),
            )
            .col_expr(delivery::Column::ErrorCode, Expr::value("unsubscribed"))
            .col_expr(delivery::Column::ErrorReason, Expr::value(reason.as_str()))
            .into_query(),
        Outcome::NotAttempted { at } => update()
            .col_expr(
                delivery::Column::Status,
                Expr::value(DeliveryStatus::Queued),
            )
            .col_expr(delivery::Column::NextAttemptAt, Expr::value(*at))
            .col_expr(
                delivery::Column::ClaimedAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .col_expr(
                delivery::Column::Attempts,
                Expr::col(delivery::Column::Attempts).sub(1),
            )
            .into_query(),
    };
    let unit = WriteUnit::new().exec(statement, Expect::Any, "delivery outcome");
    match outcome {
        Outcome::Unsubscribed { .. } if row.channel == DeliveryChannel::Sms => {
            match &row.recipient {
                Some(recipient) => unit.merge(super::consent::number_opted_out(
                    &row.practice_id,
                    recipient,
                    now,
                )),
                None => unit,
            }
        }
        _ => unit,
    }
}

/// At start, before any dispatcher runs: rows left `sending` by a crash become
/// `reconcile` (or, for an instance that deduplicates by idempotency key, `queued`
/// again). Returns how many rows became `reconcile`.
pub async fn reconcile_interrupted(state: &Shared) -> Result<u64, DispatchError> {
    let now = state.clock.now();
    let stranded: Vec<(String, Option<String>)> = delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .column(delivery::Column::Gateway)
        .filter(delivery::Column::Status.eq(DeliveryStatus::Sending))
        .filter(crate::ha::claimed_by_an_older_epoch())
        .into_tuple()
        .all(&state.db)
        .await?;
    if stranded.is_empty() {
        return Ok(0);
    }
    let (requeue, reconcile): (Vec<_>, Vec<_>) = stranded.into_iter().partition(|(_, gateway)| {
        gateway
            .as_deref()
            .and_then(|name| state.gateways.instance(name))
            .is_some_and(|instance| instance.supports_idempotency())
    });
    let mut unit = WriteUnit::new();
    let ids = |rows: &[(String, Option<String>)]| {
        rows.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>()
    };
    for chunk in ids(&reconcile).chunks(RESULT_CHUNK) {
        unit = unit.exec(
            delivery::Entity::update_many()
                .col_expr(
                    delivery::Column::Status,
                    Expr::value(DeliveryStatus::Reconcile),
                )
                .col_expr(delivery::Column::ErrorCode, Expr::value("outcome_unknown"))
                .col_expr(
                    delivery::Column::ErrorReason,
                    Expr::value(
                        "The daemon stopped while this delivery was being sent, so whether the \
                         provider took it is unknown. It is not sent again automatically: check \
                         with the provider, then resend it or close it.",
                    ),
                )
                .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
                .filter(delivery::Column::Id.is_in(chunk.to_vec()))
                .filter(delivery::Column::Status.eq(DeliveryStatus::Sending))
                .into_query(),
            Expect::Any,
            "interrupted deliveries to reconcile",
        );
    }
    for chunk in ids(&requeue).chunks(RESULT_CHUNK) {
        unit = unit.exec(
            delivery::Entity::update_many()
                .col_expr(
                    delivery::Column::Status,
                    Expr::value(DeliveryStatus::Queued),
                )
                .col_expr(
                    delivery::Column::ClaimedAt,
                    Expr::value(Option::<DateTime<Utc>>::None),
                )
                .col_expr(delivery::Column::NextAttemptAt, Expr::value(now))
                .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
                .filter(delivery::Column::Id.is_in(chunk.to_vec()))
                .filter(delivery::Column::Status.eq(DeliveryStatus::Sending))
                .into_query(),
            Expect::Any,
            "interrupted deliveries sent again by idempotency key",
        );
    }
    state.writer.write(unit).await?;
    let count = reconcile.len() as u64;
    if count > 0 {
        tracing::warn!(
            deliveries = count,
            "Deliveries interrupted by the last stop are marked `reconcile`: whether they reached the provider is unknown, so they are not sent again."
        );
        state.metrics.gateway_delivery("(any)", "reconcile", count);
    }
    if !requeue.is_empty() {
        tracing::info!(
            deliveries = requeue.len(),
            "Deliveries interrupted by the last stop are queued again: their gateways deduplicate by idempotency key."
        );
    }
    Ok(count)
}

/// Whether a retryable answer is the provider pushing back on the whole instance: it
/// named a wait (`retry_after`), or its code is HTTP 429 / Twilio's 20429.
fn is_pushback(after: Option<Duration>, code: Option<&str>) -> bool {
    after.is_some() || matches!(code, Some("429" | "20429"))
}

/// A std duration as a chrono one, rounded up to the millisecond (what is stored).
fn to_delta(duration: Duration) -> TimeDelta {
    let millis = duration.as_nanos().div_ceil(1_000_000);
    TimeDelta::milliseconds(i64::try_from(millis).unwrap_or(i64::MAX / 1_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_delta_rounds_up_to_whole_milliseconds() {
        assert_eq!(to_delta(Duration::ZERO), TimeDelta::zero());
        assert_eq!(
            to_delta(Duration::from_nanos(1)),
            TimeDelta::milliseconds(1)
        );
        assert_eq!(
            to_delta(Duration::from_millis(1500)),
            TimeDelta::milliseconds(1500)
        );
        assert_eq!(
            to_delta(Duration::MAX),
            TimeDelta::milliseconds(i64::MAX / 1_000_000)
        );
    }
}
