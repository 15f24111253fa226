//! What the staff and portal APIs share: the message as returned everywhere, a page of
//! a conversation, sending through the patient's actor, and the server-sent event
//! stream plumbing.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use caremsg_entities::{DeliveryChannel, DeliveryStatus, delivery, message};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, FromQueryResult, IdenStatic, Iterable, Value};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ApiResult};
use super::extract::Caller;
use crate::actors::conversation::{SendError, Stored};
use crate::direct::{Armed, Direct};
use crate::events::{ApiClientRef, EndReason, Event, Limits, Refused, Subscriber, Subscription};
use crate::sql::statement;
use crate::state::Shared;

/// Default and largest page of a conversation.
const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 200;

/// A delivery of a message on one channel.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeliveryOut {
    /// `sms`, `portal` or `email`.
    pub channel: String,
    /// `queued`, `sending`, `sent`, `delivered`, `failed`, `undelivered`, `reconcile`, `refused`.
    pub status: String,
    /// The provider's reason, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A message as returned anywhere.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessageOut {
    /// Position in the conversation, from 1, gapless.
    pub seq: i64,
    /// `from_patient`, `to_patient` or `system`.
    pub direction: String,
    /// Where a patient message arrived; for a staff message `sms` when an SMS delivery
    /// exists, else `portal`; `system` for system events.
    pub channel: String,
    /// The staff author of a staff message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub author_user_id: Option<String>,
    /// The text.
    pub body: String,
    /// When it was stored.
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub created_at: DateTime<Utc>,
    /// One per channel the message goes out on.
    pub deliveries: Vec<DeliveryOut>,
    /// For staff messages: when the patient marked the conversation read past it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "super::timestamp::option::serialize")]
    pub read_by_patient_at: Option<DateTime<Utc>>,
    /// The patient's text mentions an opt-out word without being the keyword.
    pub possible_opt_out: bool,
}

impl MessageOut {
    /// The message with its deliveries (those of other messages are skipped).
    pub fn new(message: message::Model, deliveries: &[delivery::Model]) -> Self {
        let deliveries = deliveries
            .iter()
            .filter(|d| d.message_id.as_deref() == Some(message.id.as_str()))
            .map(|d| DeliveryOut {
                channel: d.channel.as_str().to_owned(),
                status: d.status.as_str().to_owned(),
                error: d.error_reason.clone(),
            })
            .collect();
        Self::with(message, deliveries)
    }

    /// The message with its own deliveries, in channel order.
    fn with(message: message::Model, mut deliveries: Vec<DeliveryOut>) -> Self {
        deliveries.sort_by(|a, b| a.channel.cmp(&b.channel));
        Self {
            seq: message.seq,
            direction: message.direction.as_str().to_owned(),
            channel: message.channel.as_str().to_owned(),
            author_user_id: message.author_user_id,
            body: message.body,
            created_at: message.created_at,
            deliveries,
            read_by_patient_at: message.read_by_patient_at,
            possible_opt_out: message.possible_opt_out,
        }
    }

    /// The message just stored (or stored before, for a repeated transaction id).
    pub fn stored(stored: Stored) -> Self {
        Self::new(stored.message, &stored.deliveries)
    }
}

/// `?before=&limit=` of a conversation page.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Only messages with a lower sequence number (the `next_cursor` of the newer page).
    #[param(minimum = 1)]
    pub before: Option<i64>,
    /// At most this many messages (default 50, at most 200).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u64>,
}

/// A page of a conversation, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page {
    /// Messages in ascending `seq`.
    pub messages: Vec<MessageOut>,
    /// The `before` of the next older page; null at the beginning.
    pub next_cursor: Option<i64>,
    /// The conversation's newest sequence number (what opening it marks read).
    pub last_seq: i64,
}

/// Reads one page of `patient_id`'s conversation: the newest `limit` messages before
/// `before`, returned oldest first.
pub async fn page(state: &Shared, patient_id: &str, query: &PageQuery) -> ApiResult<Page> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid(
            "limit",
            format!("Must be between 1 and {MAX_PAGE}."),
        ));
    }
    if query.before.is_some_and(|b| b < 1) {
        return Err(ApiError::invalid(
            "before",
            "Must be a sequence number of at least 1.",
        ));
    }
    let mut messages =
        messages_with_deliveries(&state.db, patient_id, query.before, limit + 1).await?;
    let more = messages.len() as u64 > limit;
    messages.truncate(limit as usize);
    messages.reverse();
    let next_cursor = if more {
        messages.first().map(|m| m.seq)
    } else {
        None
    };
    // Every sequence number is a message's, so the newest page's first message is the
    // conversation's newest; an older page reads it from the conversation.
    let last_seq = match query.before {
        None => messages.last().map_or(0, |m| m.seq),
        Some(_) => caremsg_entities::conversation::Entity::find_by_id(patient_id.to_owned())
            .one(&state.db)
            .await?
            .map_or(0, |c| c.last_seq),
    };
    Ok(Page {
        messages,
        next_cursor,
        last_seq,
    })
}

/// The statements of [`messages_with_deliveries`]: without and with `before`.
static PAGE_SQL: [LazyLock<String>; 2] = [
    LazyLock::new(|| page_sql(false)),
    LazyLock::new(|| page_sql(true)),
];

fn page_sql(before: bool) -> String {
    let columns: Vec<String> = message::Column::iter()
        .map(|c| format!("m.{0} AS m_{0}", c.as_str()))
        .collect();
    format!(
        "SELECT {}, d.channel AS d_channel, d.status AS d_status, d.error_reason AS d_error \
         FROM (SELECT * FROM messages WHERE patient_id = ?{} \
           ORDER BY seq DESC LIMIT ?) m \
         LEFT JOIN deliveries d ON d.message_id = m.id \
         ORDER BY m.seq DESC, d.channel ASC",
        columns.join(", "),
        if before { " AND seq < ?" } else { "" }
    )
}

/// The newest `limit` messages of `patient_id` (before sequence number `before`),
/// newest first, each with its deliveries: one statement, which reads of a delivery
/// only what a page shows of it (its copy of the body, the recipient and the rest stay
/// in the database).
async fn messages_with_deliveries(
    db: &impl ConnectionTrait,
    patient_id: &str,
    before: Option<i64>,
    limit: u64,
) -> Result<Vec<MessageOut>, DbErr> {
    let mut values: Vec<Value> = vec![patient_id.to_owned().into()];
    values.extend(before.map(Value::from));
    values.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
    let sql = &PAGE_SQL[usize::from(before.is_some())];
    let rows = db
        .query_all_raw(statement(db.get_database_backend(), sql, values))
        .await?;
    // A message's rows are adjacent (ordered by seq), one per delivery.
    let mut messages: Vec<(message::Model, Vec<DeliveryOut>)> = Vec::new();
    for row in rows {
        let id: String = row.try_get("", "m_id")?;
        if messages.last().is_none_or(|(m, _)| m.id != id) {
            messages.push((message::Model::from_query_result(&row, "m_")?, Vec::new()));
        }
        if let Some(channel) = row.try_get::<Option<DeliveryChannel>>("", "d_channel")?
            && let Some((_, deliveries)) = messages.last_mut()
        {
            let status: DeliveryStatus = row.try_get("", "d_status")?;
            deliveries.push(DeliveryOut {
                channel: channel.as_str().to_owned(),
                status: status.as_str().to_owned(),
                error: row.try_get("", "d_error")?,
            });
        }
    }
    Ok(messages
        .into_iter()
        .map(|(message, deliveries)| MessageOut::with(message, deliveries))
        .collect())
}

/// `{body, client_txn_id}` of a send.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendIn {
    /// The text. Not empty or only white space; no control characters but newline
    /// and tab; at most `conversations.sms_body_max_chars` (1,600) characters when it
    /// goes out by SMS, else `conversations.portal_body_max_chars` (10,000) (422
    /// `body_too_long`).
    #[schema(
        min_length = 1,
        max_length = 10000,
        pattern = "^[^\\u0000-\\u0008\\u000B-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u0008\\u000B-\\u001F\\u007F-\\u009F]*$"
    )]
    pub body: String,
    /// Optional idempotency key, scoped to the conversation and author: a retry with
    /// the same id returns the first result; with another body it is 409 `txn_id_reused`.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$"
    )]
    pub client_txn_id: Option<String>,
}

impl From<SendError> for ApiError {
    fn from(err: SendError) -> Self {
        match err {
            SendError::NotFound => ApiError::not_found("patient"),
            SendError::Unreachable => ApiError::conflict(
                "patient_unreachable",
                "The patient can be reached neither by SMS nor through the portal; nothing was stored.",
            ),
            SendError::PortalDisabled => {
                ApiError::conflict("portal_disabled", "The practice has no portal chat.")
            }
            SendError::PortalNotEnrolled => ApiError::conflict(
                "portal_not_enrolled",
                "The patient is not enrolled in the portal.",
            ),
            SendError::EmptyBody => {
                ApiError::invalid("body", "Must not be empty or only white space.")
                    .with_code("empty_body")
            }
            SendError::TooLong { limit } => ApiError::invalid(
                "body",
                format!("Must be at most {limit} characters on this channel."),
            )
            .with_code("body_too_long"),
            SendError::BadTxnId => {
                ApiError::invalid("client_txn_id", "Must be 1 to 128 printable characters.")
            }
            SendError::TxnReused => ApiError::conflict(
                "txn_id_reused",
                "This client_txn_id was already used with a different body.",
            )
            .field("client_txn_id"),
            SendError::Storage(cause) => ApiError::internal(&cause),
            SendError::Unavailable(cause) => ApiError::from(cause),
        }
    }
}

impl From<crate::actors::ActorError> for ApiError {
    fn from(err: crate::actors::ActorError) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            err.to_string(),
        )
    }
}

/// The JSON of a `message` event.
#[derive(Debug, Serialize)]
struct MessageEventOut<'a> {
    patient_id: &'a str,
    seq: i64,
    direction: &'a str,
    channel: &'a str,
    body: &'a str,
}

/// The `data` of a `message` event: a message stored in a conversation.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageEventData {
    /// The patient whose conversation it is.
    pub patient_id: String,
    /// Its position in the conversation (resume from here: `GET …/conversation`).
    pub seq: i64,
    /// `from_patient`, `to_patient` or `system`.
    pub direction: String,
    /// `sms`, `portal` or `system`.
    pub channel: String,
    /// The text.
    pub body: String,
}

/// The `data` of an `sms_status` event: a patient's SMS authentication changed.
#[derive(Debug, Serialize, ToSchema)]
pub struct SmsStatusEventData {
    /// The patient.
    pub patient_id: String,
    /// `none`, `pending`, `enabled`, `failed` or `opted_out`.
    pub status: String,
    /// Why, when there is a reason.
    pub reason: Option<String>,
}

/// The `data` of a `lagged` event: this subscriber fell behind and missed events;
/// re-read what it shows (the conversation, the notifications) and go on.
#[derive(Debug, Serialize, ToSchema)]
pub struct LaggedEventData {
    /// How many events were missed.
    pub missed: u64,
}

/// The `data` of an `end` event, a stream's last: why the daemon ended it.
#[derive(Debug, Serialize, ToSchema)]
pub struct EndEventData {
    /// `access_revoked`, `credentials_changed`, `slow_consumer` or `idle`.
    pub reason: String,
}

/// The `data:` line of a portal stream event (`event: message` or `event: lagged`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PortalEventData {
    /// `event: message`.
    Message(MessageEventData),
    /// `event: lagged`.
    Lagged(LaggedEventData),
    /// `event: end`.
    End(EndEventData),
}

/// The `data:` line of a staff stream event (`event: message`, `notification`,
/// `sms_status` or `lagged`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StaffEventData {
    /// `event: message`.
    Message(MessageEventData),
    /// `event: notification`.
    Notification(super::notifications::NotificationOut),
    /// `event: sms_status`.
    SmsStatus(SmsStatusEventData),
    /// `event: lagged`.
    Lagged(LaggedEventData),
    /// `event: end`.
    End(EndEventData),
}

/// The wire form of `event` on a stream: `event: <name>`, one `data:` line of JSON
/// (serde_json writes no newline) and the blank line that ends an SSE event. Each
/// event is rendered once, whatever number of streams it goes to
/// ([`crate::events::Published::wire`]).
pub fn wire(event: &Event) -> Bytes {
    let (name, data) = match event {
        Event::Message(message) => (
            "message",
            serde_json::to_vec(&MessageEventOut {
                patient_id: &message.patient_id,
                seq: message.seq,
                direction: message.direction.as_str(),
                channel: message.channel.as_str(),
                body: message.body.expose(),
            }),
        ),
        Event::SmsStatus(change) => (
            "sms_status",
            serde_json::to_vec(&serde_json::json!({
                "patient_id": change.patient_id,
                "status": change.status.as_str(),
                "reason": change.reason,
            })),
        ),
        Event::Notification { notification, .. } => (
            "notification",
            serde_json::to_vec(&super::notifications::NotificationOut::from(
                notification.as_ref(),
            )),
        ),
    };
    match data {
        Ok(data) => frame(name, &data),
        Err(_) => frame("error", b"null"),
    }
}

/// One SSE event: `event: <name>\ndata: <data>\n\n` (`data` holds no newline).
fn frame(name: &str, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(name.len() + data.len() + 16);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    out.freeze()
}

/// The `end` event a stream's last: `{"reason": ...}` (no PHI).
fn end_event(reason: EndReason) -> Bytes {
    frame(
        "end",
        format!("{{\"reason\":\"{}\"}}", reason.as_str()).as_bytes(),
    )
}

/// An SSE comment: keeps an idle stream's connection open.
const KEEP_ALIVE: &[u8] = b":\n\n";

/// Most bytes of events written to a stream at once.
const MAX_CHUNK: usize = 64 * 1024;

/// Opens a stream for `who` under the `[events]` caps: 429 `too_many_streams` past
/// the per-subscriber cap, 503 `stream_capacity` past the total, both with
/// `Retry-After`.
pub fn open_stream(
    state: &Shared,
    caller: &Caller,
    who: Subscriber,
) -> Result<Subscription, StreamRefused> {
    let settings = state.settings.load();
    let client = ApiClientRef {
        name: &caller.client,
        token_sha256: &caller.token_sha256,
    };
    state
        .events
        .open(who, &client, Limits::from(&settings.events))
        .map_err(|refused| {
            let error = match refused {
                Refused::PerSubscriber => ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    format!(
                        "At most {} event streams may be open at once for one user or patient; close one first.",
                        settings.events.max_streams_per_subscriber
                    ),
                ),
                Refused::Total => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "stream_capacity",
                    "The daemon has as many event streams open as it is configured for; try again later.",
                ),
            };
            StreamRefused(error)
        })
}

/// A stream refused at a cap: its error, answered with `Retry-After`.
#[derive(Debug)]
pub struct StreamRefused(ApiError);

impl IntoResponse for StreamRefused {
    fn into_response(self) -> Response {
        ([(header::RETRY_AFTER, STREAM_RETRY_AFTER_SECS)], self.0).into_response()
    }
}

/// What a refused stream's `Retry-After` says, in seconds.
const STREAM_RETRY_AFTER_SECS: &str = "30";

/// The server-sent event stream of `subscription`: the events `shows` lets through
/// (the hub delivered only what this subscriber may see), keep-alive comments after
/// `server.sse_keepalive` without a write, a last `end` event when the daemon ends
/// the stream (access lost, slow consumer, or `events.idle_timeout` without an
/// event), and a plain end when the daemon stops serving. Events already waiting are
/// written together, in one chunk: a message and its notification, published
/// together, cost the stream one socket write, not two. An event that arrives within
/// `events.coalesce` of the stream's last write of events waits for the end of that
/// spell and goes out with whatever else arrived in it ([`EventChunks`]). With
/// `direct` (the response is chunked), the hub writes the events of a quiet stream
/// to its connection itself ([`crate::direct`]).
pub fn stream(
    state: &Shared,
    subscription: Subscription,
    shows: fn(&Event) -> bool,
    direct: Option<Arc<Direct>>,
) -> Response {
    let settings = state.settings.load();
    let direct = direct.filter(|_| settings.events.direct_writes);
    if let Some(direct) = &direct {
        subscription.write_directly(direct.clone());
    }
    let chunks = EventChunks::new(
        subscription,
        shows,
        state.shutdown.clone(),
        Timing {
            idle: settings.events.idle_timeout,
            keepalive: settings.server.sse_keepalive,
            coalesce: settings.events.coalesce,
        },
        direct,
    );
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(chunks),
    )
        .into_response()
}

/// The times of one event stream, read from the settings when it opens.
#[derive(Debug, Clone, Copy)]
struct Timing {
    // No event for this long: the stream ends (`idle`).
    idle: Duration,
    // No write for this long: a keep-alive comment.
    keepalive: Duration,
    // Events arriving within this long of the last write of events wait for the end
    // of the spell and are written together.
    coalesce: Duration,
}

/// The chunks of one event stream ([`stream`]). What it waits on is made once per
/// stream, not once per event: an event costs a channel receive and a clock read,
/// and the one timer (keep-alive, idle end or the end of a coalescing spell,
/// whichever is first) moves only when it fires early or a spell begins.
///
/// Coalescing: the first event after a quiet spell is written at once; events that
/// arrive within `coalesce` of that write are taken off the channel, rendered into
/// `pending` and written together when the spell ends, or at once when `pending`
/// reaches [`MAX_CHUNK`]. Under a burst a stream makes at most one write per spell
/// instead of one per commit; a lone event is never delayed. The channel stays empty
/// while events wait, so a consumer is still judged slow only when its connection
/// stops taking writes (then `pending` is full and nothing drains the channel).
struct EventChunks {
    subscription: Subscription,
    shows: fn(&Event) -> bool,
    // The daemon stops serving: a plain end.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    // The daemon ended the stream: the `end` event.
    ended: Pin<Box<WaitForCancellationFutureOwned>>,
    timer: Pin<Box<tokio::time::Sleep>>,
    timing: Timing,
    // The last event received (shown or not): the stream ends `idle` after it.
    last_event: Instant,
    // The last chunk written: a keep-alive is due `keepalive` after it.
    last_write: Instant,
    // The last chunk of events written: events are held until `coalesce` after it.
    last_events_write: Instant,
    // Events received and rendered, not yet written (at most about `MAX_CHUNK`).
    pending: BytesMut,
    // The channel said the hub is gone: write what is pending, then end.
    hub_gone: bool,
    done: bool,
    // Direct writes of the hub to this stream's connection (armed at the first poll).
    direct: Option<Arc<Direct>>,
    armed: bool,
}

impl EventChunks {
    fn new(
        subscription: Subscription,
        shows: fn(&Event) -> bool,
        shutdown: CancellationToken,
        timing: Timing,
        direct: Option<Arc<Direct>>,
    ) -> Self {
        let now = Instant::now();
        Self {
            ended: Box::pin(subscription.ended()),
            subscription,
            shows,
            shutdown: Box::pin(shutdown.cancelled_owned()),
            timer: Box::pin(tokio::time::sleep_until(
                now + timing.keepalive.min(timing.idle),
            )),
            timing,
            last_event: now,
            last_write: now,
            // A stream's first event is written at once.
            last_events_write: now.checked_sub(timing.coalesce).unwrap_or(now),
            pending: BytesMut::new(),
            hub_gone: false,
            done: false,
            direct,
            armed: false,
        }
    }

    /// Before a poll: arms the direct writes at the first, and counts the hub's last
    /// direct write as a write of this stream's (its keep-alive and idle end).
    fn polling(&mut self) {
        let Some(direct) = self.direct.as_ref().filter(|_| !self.done) else {
            return;
        };
        if !self.armed {
            self.armed = true;
            direct.arm(
                Armed {
                    shows: self.shows,
                    render: wire,
                    coalesce: self.timing.coalesce,
                },
                self.last_events_write,
            );
        }
        if let Some(at) = direct.polling()
            && at > self.last_events_write
        {
            self.last_events_write = at;
            self.last_event = self.last_event.max(at);
            self.last_write = self.last_write.max(at);
        }
    }

    /// After a poll: tells the direct writes what the stream did.
    fn polled(&self, polled: &Poll<Option<Result<Bytes, Infallible>>>, cx: &Context<'_>) {
        let Some(direct) = &self.direct else {
            return;
        };
        match polled {
            _ if self.done => direct.disarm(),
            Poll::Pending => direct.parked(self.pending.is_empty() && !self.hub_gone, cx.waker()),
            Poll::Ready(_) => direct.handing(self.last_events_write),
        }
    }

    /// The stream's last chunk: the `end` event, when the daemon ended it.
    fn end(&mut self, reason: Option<EndReason>) -> Poll<Option<Result<Bytes, Infallible>>> {
        self.done = true;
        Poll::Ready(reason.map(|reason| Ok(end_event(reason))))
    }

    /// Writes the pending events.
    fn flush(&mut self, now: Instant) -> Poll<Option<Result<Bytes, Infallible>>> {
        self.last_write = now;
        self.last_events_write = now;
        Poll::Ready(Some(Ok(self.pending.split().freeze())))
    }

    /// When the pending events are to be written (`None`: nothing pending).
    fn flush_at(&self) -> Option<Instant> {
        (!self.pending.is_empty()).then(|| self.last_events_write + self.timing.coalesce)
    }
}

impl futures::Stream for EventChunks {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.polling();
        let polled = this.poll_chunk(cx);
        this.polled(&polled, cx);
        polled
    }
}

impl EventChunks {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Infallible>>> {
        let this = self;
        if this.done || this.shutdown.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(None);
        }
        if this.ended.as_mut().poll(cx).is_ready() {
            let reason = this.subscription.end_reason();
            return this.end(reason);
        }
        // Take what waits on the channel, up to a chunk's worth.
        let mut received = false;
        while !this.hub_gone && this.pending.len() < MAX_CHUNK {
            match this.subscription.poll_event(cx) {
                Poll::Ready(Some(published)) => {
                    received = true;
                    if (this.shows)(&published.event) {
                        this.pending.extend_from_slice(&published.wire(wire));
                    }
                }
                Poll::Ready(None) => this.hub_gone = true,
                Poll::Pending => break,
            }
        }
        // Ended while events were taken (access lost, a reload): none of them is
        // written, nor anything pending.
        if this.subscription.is_ended() {
            let reason = this.subscription.end_reason();
            return this.end(reason);
        }
        let now = Instant::now();
        if received {
            this.last_event = now;
        }
        if let Some(flush_at) = this.flush_at() {
            if now >= flush_at || this.pending.len() >= MAX_CHUNK || this.hub_gone {
                return this.flush(now);
            }
            // A spell began: the timer must fire by its end.
            if this.timer.deadline() > flush_at {
                this.timer.as_mut().reset(flush_at);
            }
        }
        if this.hub_gone {
            return this.end(None);
        }
        loop {
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let idle_at = this.last_event + this.timing.idle;
            let keepalive_at = this.last_write + this.timing.keepalive;
            match this.flush_at() {
                // Events wait: written at the end of their spell, or sooner when a
                // keep-alive would be due (a write of events keeps the stream open).
                Some(flush_at) if now >= flush_at.min(keepalive_at) => return this.flush(now),
                Some(_) => {}
                None if now >= idle_at => {
                    let reason = this.subscription.end_idle();
                    return this.end(reason);
                }
                None => {}
            }
            if now >= keepalive_at {
                this.last_write = now;
                let next = (now + this.timing.keepalive).min(idle_at);
                this.timer.as_mut().reset(next);
                return Poll::Ready(Some(Ok(Bytes::from_static(KEEP_ALIVE))));
            }
            // Events came since the timer was set: it is early; move it.
            let next = keepalive_at.min(idle_at);
            let next = this.flush_at().map_or(next, |flush_at| next.min(flush_at));
            this.timer.as_mut().reset(next);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed test.

    use futures::StreamExt;

    use super::*;
    use crate::events::{AccessChange, EventMetrics, Events};

    const IDLE: Duration = Duration::from_secs(60);
    const KEEPALIVE: Duration = Duration::from_secs(15);
    const COALESCE: Duration = Duration::from_millis(100);

    fn open(events: &Events, user: &str) -> EventChunks {
        open_with(events, user, 8)
    }

    fn open_with(events: &Events, user: &str, buffer: usize) -> EventChunks {
        open_on(events, user, buffer, None)
    }

    fn open_on(
        events: &Events,
        user: &str,
        buffer: usize,
        direct: Option<Arc<Direct>>,
    ) -> EventChunks {
        let subscription = events
            .open(
                Subscriber::Staff {
                    user_id: user.into(),
                    practice_id: "p".into(),
                },
                &ApiClientRef {
                    name: "c",
                    token_sha256: "h",
                },
                Limits {
                    max_streams: 9,
                    per_subscriber: 9,
                    buffer,
                },
            )
            .unwrap();
        if let Some(direct) = &direct {
            subscription.write_directly(direct.clone());
        }
        EventChunks::new(
            subscription,
            |_| true,
            CancellationToken::new(),
            Timing {
                idle: IDLE,
                keepalive: KEEPALIVE,
                coalesce: COALESCE,
            },
            direct,
        )
    }

    fn notification(user: &str) -> Event {
        Event::Notification {
            user_id: user.into(),
            notification: crate::events::test_notification(user),
        }
    }

    fn count(chunk: &Bytes, what: &str) -> usize {
        chunk
            .windows(what.len())
            .filter(|w| *w == what.as_bytes())
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alives_follow_quiet_spells_and_an_idle_stream_ends() {
        let events = Events::new(None, EventMetrics::default(), 16);
        let mut chunks = open(&events, "a");
        let start = Instant::now();
        let chunk = chunks.next().await.unwrap().unwrap();
        assert_eq!(&chunk[..], KEEP_ALIVE);
        assert_eq!(start.elapsed(), KEEPALIVE);

        // An event 5 s later: written at once, and the next keep-alive is due a full
        // keep-alive period after it, not after the last keep-alive.
        tokio::time::advance(Duration::from_secs(5)).await;
        events.publish_all(vec![notification("a")]).await;
        let chunk = chunks.next().await.unwrap().unwrap();
        assert_eq!(count(&chunk, "event: notification"), 1);
        let event_at = start.elapsed();
        assert_eq!(event_at, Duration::from_secs(20));
        let chunk = chunks.next().await.unwrap().unwrap();
        assert_eq!(&chunk[..], KEEP_ALIVE);
        assert_eq!(start.elapsed(), event_at + KEEPALIVE);

        // Keep-alives do not keep a stream alive: it ends `IDLE` after its last
        // event, with an `end` event, and then the body ends.
        let mut keep_alives = 0;
        let last = loop {
            let chunk = chunks.next().await.unwrap().unwrap();
            if &chunk[..] != KEEP_ALIVE {
                break chunk;
            }
            keep_alives += 1;
        };
        assert_eq!(start.elapsed(), event_at + IDLE);
        assert_eq!(keep_alives, 2, "at 50 s and 65 s");
        assert_eq!(count(&last, "event: end"), 1);
        assert_eq!(count(&last, "\"reason\":\"idle\""), 1);
        assert!(chunks.next().await.is_none());
        assert_eq!(events.open_streams(), 1, "held until the body is dropped");
        drop(chunks);
        assert_eq!(events.open_streams(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn events_published_together_are_one_write_in_their_order() {
        let events = Events::new(None, EventMetrics::default(), 16);
        let mut a = open(&events, "a");
        let mut b = open(&events, "b");
        events
            .publish_all(vec![
                notification("a"),
                notification("b"),
                notification("a"),
            ])
            .await;
        let chunk = a.next().await.unwrap().unwrap();
        assert_eq!(count(&chunk, "event: notification"), 2);
        let chunk = b.next().await.unwrap().unwrap();
        assert_eq!(count(&chunk, "event: notification"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_event_goes_out_at_once_and_a_burst_waits_for_the_end_of_its_spell() {
        let events = Events::new(None, EventMetrics::default(), 16);
        let mut chunks = open(&events, "a");
        let start = Instant::now();
        events.publish_all(vec![notification("a")]).await;
        let chunk = chunks.next().await.unwrap().unwrap();
        assert_eq!(count(&chunk, "event: notification"), 1);
        assert_eq!(start.elapsed(), Duration::ZERO, "the first event: at once");

        // Two commits within the spell: one write, at its end, with both.
        tokio::time::advance(Duration::from_millis(10)).await;
        events.publish_all(vec![notification("a")]).await;
        tokio::time::advance(Duration::from_millis(40)).await;
        events.publish_all(vec![notification("a")]).await;
        let chunk = chunks.next().await.unwrap().unwrap();
        assert_eq!(count(&chunk, "event: notification"), 2);
        assert_eq!(start.elapsed(), COALESCE);

        // After a quiet spell, the next event goes out at once again.
        tokio::time::advance(Duration::from_secs(3)).await;
        let published_at = start.elapsed();
        events.publish_all(vec![notification("a")]).await;
        let chunk = chunks.next().await.unwrap().unwrap();
        assert_eq!(count(&chunk, "event: notification"), 1);
        assert_eq!(start.elapsed(), published_at);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spell_that_gathers_a_full_chunk_writes_it_without_waiting() {
        let events = Events::new(None, EventMetrics::default(), 16);
        let mut chunks = open_with(&events, "a", 4_096);
        events.publish_all(vec![notification("a")]).await;
        let one = chunks.next().await.unwrap().unwrap().len();
        let start = Instant::now();
        let burst = MAX_CHUNK / one + 10;
        events
            .publish_all((0..burst).map(|_| notification("a")).collect())
            .await;
        let full = chunks.next().await.unwrap().unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a full chunk does not wait"
        );
        assert!(full.len() >= MAX_CHUNK, "{}", full.len());
        let rest = chunks.next().await.unwrap().unwrap();
        assert_eq!(
            start.elapsed(),
            COALESCE,
            "the rest waits for the spell's end"
        );
        assert_eq!(
            count(&full, "event: notification") + count(&rest, "event: notification"),
            burst,
            "nothing lost, nothing twice"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_coalescing_off_every_commit_is_written_as_it_comes() {
        let events = Events::new(None, EventMetrics::default(), 16);
        let mut chunks = open(&events, "a");
        chunks.timing.coalesce = Duration::ZERO;
        let start = Instant::now();
        for k in 1..=3u32 {
            events.publish_all(vec![notification("a")]).await;
            let chunk = chunks.next().await.unwrap().unwrap();
            assert_eq!(count(&chunk, "event: notification"), 1);
            assert_eq!(start.elapsed(), Duration::from_millis(10) * (k - 1));
            tokio::time::advance(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn events_held_for_a_spell_are_not_shown_after_access_is_lost() {
        let events = Events::new(None, EventMetrics::default(), 16);
        let mut chunks = open(&events, "a");
        events.publish_all(vec![notification("a")]).await;
        chunks.next().await.unwrap().unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        events.publish_all(vec![notification("a")]).await;
        // The stream takes the event off its channel and holds it for the spell.
        assert!(futures::poll!(chunks.next()).is_pending());
        events.access_changed(AccessChange::User {
            id: "a",
            active: false,
        });
        let last = chunks.next().await.unwrap().unwrap();
        assert_eq!(count(&last, "event: end"), 1);
        assert_eq!(count(&last, "event: notification"), 0);
        assert!(chunks.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_whose_user_lost_access_ends_with_the_reason() {
        let events = Events::new(None, EventMetrics::default(), 16);
        let mut chunks = open(&events, "a");
        events.access_changed(AccessChange::User {
            id: "a",
            active: false,
        });
        let start = Instant::now();
        let last = chunks.next().await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO, "at once");
        assert_eq!(count(&last, "event: end"), 1);
        assert_eq!(count(&last, "\"reason\":\"idle\""), 0);
        assert!(chunks.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_hubs_direct_writes_count_for_the_keep_alive_and_the_idle_end() {
        use crate::direct::tests::{hyper_flushes, read_now, socket_pair};
        let metrics = EventMetrics::default();
        let events = Events::new(None, metrics.clone(), 16);
        let (mut io, mut client) = socket_pair().await;
        let direct = Arc::new(Direct::default());
        let mut chunks = open_on(&events, "a", 8, Some(direct.clone()));
        let start = Instant::now();
        // hyper polls the body (which arms the direct writes) and flushes the head.
        assert!(futures::poll!(chunks.next()).is_pending());
        assert!(hyper_flushes(&direct, &mut io).is_ready());

        // An event at 5 s goes out from the hub; the stream's task is not woken.
        tokio::time::advance(Duration::from_secs(5)).await;
        events.publish_all(vec![notification("a")]).await;
        assert_eq!(metrics.written_directly.get(), 1);
        let wrote = read_now(&mut client);
        assert_eq!(count(&Bytes::from(wrote), "event: notification"), 1);
        // Its next write is a keep-alive a full period after that event.
        let chunk = chunks.next().await.unwrap().unwrap();
        assert_eq!(&chunk[..], KEEP_ALIVE);
        assert_eq!(start.elapsed(), Duration::from_secs(5) + KEEPALIVE);
        assert!(futures::poll!(chunks.next()).is_pending());
        assert!(hyper_flushes(&direct, &mut io).is_ready());

        // Another at 50 s, while the task sleeps: the stream ends idle `IDLE` after
        // it, not after the first, with keep-alives a period apart from it.
        tokio::time::advance(Duration::from_secs(30)).await;
        events.publish_all(vec![notification("a")]).await;
        assert_eq!(metrics.written_directly.get(), 2);
        let wrote = read_now(&mut client);
        assert_eq!(count(&Bytes::from(wrote), "event: notification"), 1);
        let last_event = start.elapsed();
        let mut keep_alives = Vec::new();
        let last = loop {
            let chunk = chunks.next().await.unwrap().unwrap();
            if &chunk[..] != KEEP_ALIVE {
                break chunk;
            }
            keep_alives.push(start.elapsed() - last_event);
        };
        assert_eq!(keep_alives, [KEEPALIVE, KEEPALIVE * 2, KEEPALIVE * 3]);
        assert_eq!(start.elapsed(), last_event + IDLE);
        assert_eq!(count(&last, "\"reason\":\"idle\""), 1);
        // Nothing more from the hub once it ended.
        events.publish_all(vec![notification("a")]).await;
        assert_eq!(metrics.written_directly.get(), 2);
        assert!(read_now(&mut client).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_daemon_ends_streams_plainly() {
        let events = Events::new(None, EventMetrics::default(), 16);
        let mut chunks = open(&events, "a");
        let stop = CancellationToken::new();
        chunks.shutdown = Box::pin(stop.clone().cancelled_owned());
        stop.cancel();
        assert!(chunks.next().await.is_none());
    }
}
