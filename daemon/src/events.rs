//! Live events: the hub behind the server-sent event streams of staff and portal.
//!
//! Events are published *after* the change they describe has committed. Each event's
//! **audience** — the staff users who may see it under the access rule, and the
//! portal patient it belongs to — is computed once, at publish, and the event is put
//! only into the channels of those subscribers: one bounded channel per stream,
//! found through per-user and per-patient maps. Subscribers never read the database.
//! The audience of a patient's conversation (care team and notification users who
//! pass [`crate::access::ACCESSIBLE`]) is one query, cached per patient until an
//! admin change or a notify-me answer invalidates it ([`Events::access_changed`]).
//!
//! A stream ends — with a last `end` event naming why — when its user or patient
//! loses access (deactivated, practice deactivated, portal chat turned off), when a
//! reload no longer lists its token, when its consumer falls `events.buffer` events
//! behind (it is dropped, never buffered without bound), or when it delivered
//! nothing for `events.idle_timeout`. The number of streams is capped per staff user
//! or portal patient and in total.
//!
//! **Architecture Invariant:** nothing on the delivery path of an event reads the
//! database per subscriber; the only read is the audience query, once per patient
//! until invalidated.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Poll;
#[cfg(test)]
use std::time::Duration;

use caremsg_config::{ApiClient, Scope};
use caremsg_entities::{Channel, Direction, notification};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::direct::{Direct, Wrote};
use crate::phi::Body;

/// A new message in a conversation.
#[derive(Debug, Clone)]
pub struct MessageEvent {
    /// The conversation.
    pub patient_id: String,
    /// Its practice.
    pub practice_id: String,
    /// The message's position.
    pub seq: i64,
    /// Who it is from.
    pub direction: Direction,
    /// Where it arrived or went.
    pub channel: Channel,
    /// The text (PHI: only the stream's JSON shows it).
    pub body: Body,
}

/// An SMS authentication status change of a patient.
#[derive(Debug, Clone)]
pub struct SmsStatusEvent {
    /// The patient.
    pub patient_id: String,
    /// Its practice.
    pub practice_id: String,
    /// The new status.
    pub status: caremsg_entities::SmsStatus,
    /// Why, when known (`wrong_dob_3x`, `expired`, `patient_stop`, `number_changed`, ...).
    pub reason: Option<String>,
}

/// Everything the streams may carry.
#[derive(Debug, Clone)]
pub enum Event {
    /// A message was stored.
    Message(Arc<MessageEvent>),
    /// A patient's SMS authentication status changed.
    SmsStatus(Arc<SmsStatusEvent>),
    /// A notification for one staff user was stored (only that user's stream shows it).
    Notification {
        /// The user notified.
        user_id: String,
        /// The notification.
        notification: Arc<notification::Model>,
    },
}

/// An event as the streams receive it: one allocation shared by every stream it is
/// offered to, with its wire form (the SSE bytes) rendered once, by the first stream
/// that writes it, and copied by none.
#[derive(Debug)]
pub struct Published {
    /// The event.
    pub event: Event,
    wire: OnceLock<bytes::Bytes>,
}

impl Published {
    pub(crate) fn new(event: Event) -> Arc<Self> {
        Arc::new(Self {
            event,
            wire: OnceLock::new(),
        })
    }

    /// The event's wire form: `render`ed by the first caller, shared after. Every
    /// stream must render an event the same way (they do: one SSE form per event).
    pub fn wire(&self, render: impl FnOnce(&Event) -> bytes::Bytes) -> bytes::Bytes {
        self.wire.get_or_init(|| render(&self.event)).clone()
    }
}

/// Whom a stream is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subscriber {
    /// A staff user's stream (`/v1/staff/events`).
    Staff {
        /// The user.
        user_id: String,
        /// The user's practice.
        practice_id: String,
    },
    /// The portal backend's stream of one patient's conversation.
    Portal {
        /// The patient.
        patient_id: String,
        /// The patient's practice.
        practice_id: String,
    },
}

impl Subscriber {
    fn practice_id(&self) -> &str {
        match self {
            Self::Staff { practice_id, .. } | Self::Portal { practice_id, .. } => practice_id,
        }
    }

    fn scope(&self) -> Scope {
        match self {
            Self::Staff { .. } => Scope::Staff,
            Self::Portal { .. } => Scope::Portal,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Staff { .. } => "staff",
            Self::Portal { .. } => "portal",
        }
    }
}

/// Why a stream ended before its client hung up (the `reason` of its `end` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Its user or patient lost access (deactivated, practice deactivated, portal off).
    AccessRevoked,
    /// A reload no longer lists its token with this scope and practice.
    CredentialsChanged,
    /// Its consumer fell `events.buffer` events behind.
    SlowConsumer,
    /// No event for `events.idle_timeout`.
    Idle,
}

impl EndReason {
    /// The name in the `end` event and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AccessRevoked => "access_revoked",
            Self::CredentialsChanged => "credentials_changed",
            Self::SlowConsumer => "slow_consumer",
            Self::Idle => "idle",
        }
    }
}

/// Why a stream was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The user (or portal patient) has `events.max_streams_per_subscriber` open.
    PerSubscriber,
    /// `events.max_streams` are open.
    Total,
}

/// A change that may narrow who sees what: called after the admin (or notify-me)
/// change committed.
#[derive(Debug, Clone, Copy)]
pub enum AccessChange<'a> {
    /// A practice was upserted or deactivated.
    Practice {
        /// Its id.
        id: &'a str,
        /// Whether it is active now.
        active: bool,
        /// Whether portal chat is on now.
        portal_enabled: bool,
    },
    /// A user was upserted (restrictions may have changed) or deactivated.
    User {
        /// Its id.
        id: &'a str,
        /// Whether the user is active now.
        active: bool,
    },
    /// A patient was upserted (programs, care team, enrollment) or deactivated.
    Patient {
        /// Its id.
        id: &'a str,
        /// Whether the patient is active now.
        active: bool,
        /// Whether the patient is portal-enrolled now.
        portal_enrolled: bool,
    },
    /// A patient's notification users changed (notify-me).
    Panel {
        /// The patient.
        patient_id: &'a str,
    },
}

/// Labels of a stream count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `staff` or `portal`.
    pub kind: String,
}

/// Labels of a stream refused or ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: String,
}

/// The event streams' metrics (registered by [`crate::metrics::Metrics::new`], which
/// holds the registry).
#[derive(Debug, Clone, Default)]
pub struct EventMetrics {
    /// Streams open now, by kind.
    pub streams: Family<StreamLabels, Gauge>,
    /// Streams refused at a cap, by reason (`per_subscriber`, `total`).
    pub refused: Family<ReasonLabels, Counter>,
    /// Streams the daemon ended, by reason.
    pub ended: Family<ReasonLabels, Counter>,
    /// Events delivered to streams: put into their channels or written directly.
    pub delivered: Counter,
    /// Of those, events the publisher wrote to a quiet stream's socket itself
    /// ([`crate::direct`]).
    pub written_directly: Counter,
    /// Database reads computing an event's audience (cache misses).
    pub audience_reads: Counter,
}

impl EventMetrics {
    fn reason(family: &Family<ReasonLabels, Counter>, reason: &str) {
        family
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// The caps and buffer of a new stream (`[events]`, read per subscription).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Streams in total.
    pub max_streams: usize,
    /// Streams per staff user or portal patient.
    pub per_subscriber: usize,
    /// Events waiting per stream.
    pub buffer: usize,
}

impl From<&caremsg_config::Events> for Limits {
    fn from(events: &caremsg_config::Events) -> Self {
        Self {
            max_streams: events.max_streams,
            per_subscriber: events.max_streams_per_subscriber,
            buffer: events.buffer,
        }
    }
}

/// Most patients whose audience is cached; past it the cache starts over.
const AUDIENCE_CACHE_MAX: usize = 50_000;

/// One open stream, as the hub sees it.
#[derive(Debug)]
struct Sub {
    // Identifies it in the maps (a user may have several).
    id: u64,
    // Whose stream.
    who: Subscriber,
    // The API client that opened it, and its token hash, for `revalidate`.
    client: String,
    token_sha256: String,
    // Where its events go; bounded by `events.buffer`.
    tx: mpsc::Sender<Arc<Published>>,
    // Cancelled to end the stream at once (buffered events are not delivered).
    cancel: CancellationToken,
    // Why it was ended, first reason wins.
    reason: OnceLock<EndReason>,
    // Its connection's direct writes, when its body is chunked.
    direct: OnceLock<Arc<Direct>>,
}

impl Sub {
    fn end(&self, reason: EndReason, metrics: &EventMetrics) {
        // No direct write of the hub's goes out after the end.
        let _held = self.direct.get().map(|direct| direct.hold());
        if self.reason.set(reason).is_ok() {
            EventMetrics::reason(&metrics.ended, reason.as_str());
            self.cancel.cancel();
        }
    }
}

/// The open streams, by whom they are for.
#[derive(Debug, Default)]
struct Streams {
    // Staff streams by user id.
    staff: HashMap<String, Vec<Arc<Sub>>>,
    // Portal streams by patient id.
    portal: HashMap<String, Vec<Arc<Sub>>>,
    // Staff streams per practice: no audience is computed for a practice without any.
    staff_per_practice: HashMap<String, usize>,
    // Streams counted against the caps (a stream ended but not yet dropped by its
    // connection still holds its place).
    counted: HashMap<Subscriber, usize>,
    total: usize,
}

impl Streams {
    fn map<'s, 'w>(
        &'s mut self,
        who: &'w Subscriber,
    ) -> (&'s mut HashMap<String, Vec<Arc<Sub>>>, &'w str) {
        match who {
            Subscriber::Staff { user_id, .. } => (&mut self.staff, user_id),
            Subscriber::Portal { patient_id, .. } => (&mut self.portal, patient_id),
        }
    }

    /// Takes `sub` out of the delivery maps (it keeps its place in the caps).
    fn unlist(&mut self, sub: &Sub) {
        let (map, key) = self.map(&sub.who);
        let key = key.to_owned();
        let mut removed = false;
        if let Some(list) = map.get_mut(&key) {
            let before = list.len();
            list.retain(|s| s.id != sub.id);
            removed = list.len() < before;
            if list.is_empty() {
                map.remove(&key);
            }
        }
        if removed && let Subscriber::Staff { practice_id, .. } = &sub.who {
            decrement(&mut self.staff_per_practice, practice_id);
        }
    }
}

fn decrement<K: std::hash::Hash + Eq + Clone>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// Cached audiences, and a generation that every invalidation bumps: a query begun
/// before an invalidation does not fill the cache with what it read.
#[derive(Debug, Default)]
struct Audiences {
    generation: u64,
    by_patient: HashMap<String, Arc<[String]>>,
}

#[derive(Debug)]
struct Inner {
    // Internal listeners (the gateway dispatchers' wake-up) see every event.
    wake: broadcast::Sender<Event>,
    streams: Mutex<Streams>,
    audiences: Mutex<Audiences>,
    next_id: AtomicU64,
    // Reads audiences; `None` in tests of the hub alone.
    db: Option<DatabaseConnection>,
    metrics: EventMetrics,
}

/// The in-process event hub.
#[derive(Debug, Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

/// Locks `mutex`, also after a panic elsewhere poisoned it (the maps stay
/// consistent: every critical section is a few map operations).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Events {
    /// A hub reading audiences from `db`, keeping up to `capacity` events for its
    /// internal listeners.
    pub fn new(db: Option<DatabaseConnection>, metrics: EventMetrics, capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                wake: broadcast::channel(capacity.max(16)).0,
                streams: Mutex::default(),
                audiences: Mutex::default(),
                next_id: AtomicU64::new(1),
                db,
                metrics,
            }),
        }
    }

    /// Every event, for in-process listeners that only need to know something
    /// happened (not for streams: they subscribe with [`Events::open`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.wake.subscribe()
    }

    /// Opens a stream for `who`, opened by `client`, within `limits`.
    pub fn open(
        &self,
        who: Subscriber,
        client: &ApiClientRef<'_>,
        limits: Limits,
    ) -> Result<Subscription, Refused> {
        let mut streams = lock(&self.inner.streams);
        if streams.total >= limits.max_streams {
            drop(streams);
            EventMetrics::reason(&self.inner.metrics.refused, "total");
            return Err(Refused::Total);
        }
        if streams.counted.get(&who).copied().unwrap_or(0) >= limits.per_subscriber {
            drop(streams);
            EventMetrics::reason(&self.inner.metrics.refused, "per_subscriber");
            return Err(Refused::PerSubscriber);
        }
        let (tx, rx) = mpsc::channel(limits.buffer.max(1));
        let sub = Arc::new(Sub {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            who: who.clone(),
            client: client.name.to_owned(),
            token_sha256: client.token_sha256.to_owned(),
            tx,
            cancel: CancellationToken::new(),
            reason: OnceLock::new(),
            direct: OnceLock::new(),
        });
        streams.total += 1;
        *streams.counted.entry(who.clone()).or_default() += 1;
        if let Subscriber::Staff { practice_id, .. } = &who {
            *streams
                .staff_per_practice
                .entry(practice_id.clone())
                .or_default() += 1;
        }
        let (map, key) = streams.map(&who);
        let key = key.to_owned();
        map.entry(key).or_default().push(sub.clone());
        drop(streams);
        self.inner
            .metrics
            .streams
            .get_or_create(&StreamLabels {
                kind: who.kind().to_owned(),
            })
            .inc();
        Ok(Subscription {
            rx,
            sub,
            hub: self.inner.clone(),
        })
    }

    /// Streams open now (all kinds).
    pub fn open_streams(&self) -> usize {
        lock(&self.inner.streams).total
    }

    /// Publishes a committed change to the streams allowed to see it and to the
    /// internal listeners. A message's or status change's staff audience is read (once
    /// per patient, then cached) only when its practice has staff streams open.
    pub async fn publish(&self, event: Event) {
        self.publish_all(vec![event]).await;
    }

    /// Publishes a notification to its user's streams (no audience to compute).
    pub fn notify(&self, user_id: String, notification: Arc<notification::Model>) {
        // Not held while they are delivered (a delivery may be a write).
        let subs: Vec<Arc<Sub>> = lock(&self.inner.streams)
            .staff
            .get(&user_id)
            .cloned()
            .unwrap_or_default();
        let event = Event::Notification {
            user_id,
            notification,
        };
        let _ = self.inner.wake.send(event.clone());
        let event = Published::new(event);
        let now = tokio::time::Instant::now();
        for sub in &subs {
            self.deliver(sub, std::iter::once(&event), now);
        }
    }

    /// Publishes the changes of one commit (a message and the notifications it
    /// caused, say), as [`Events::publish`] does each, but stream by stream: every
    /// event for one stream is put in its channel before the next stream gets any, so
    /// a stream woken by its first event finds the others already waiting and writes
    /// them all at once (one socket write for a message and its notification, not
    /// two). Each stream receives its events in the order given.
    pub async fn publish_all(&self, events: Vec<Event>) {
        let mut published = Vec::with_capacity(events.len());
        let mut audiences = Vec::with_capacity(events.len());
        for event in events {
            let _ = self.inner.wake.send(event.clone());
            let audience = match &event {
                Event::Message(message) => {
                    self.audience_if_streams(&message.patient_id, &message.practice_id)
                        .await
                }
                Event::SmsStatus(change) => {
                    self.audience_if_streams(&change.patient_id, &change.practice_id)
                        .await
                }
                Event::Notification { .. } => None,
            };
            published.push(Published::new(event));
            audiences.push(audience);
        }
        let streams = lock(&self.inner.streams);
        // (stream, event) pairs, then grouped by stream keeping each one's order. The
        // lock is not held while they are delivered (a delivery may be a write).
        let mut pairs: Vec<(Arc<Sub>, usize)> = Vec::new();
        for (i, (event, audience)) in published.iter().zip(&audiences).enumerate() {
            let staff = audience.iter().flat_map(|a| a.iter());
            let lists: Vec<Option<&Vec<Arc<Sub>>>> = match &event.event {
                Event::Notification { user_id, .. } => vec![streams.staff.get(user_id)],
                Event::Message(message) => std::iter::once(&streams.portal)
                    .map(|portal| portal.get(message.patient_id.as_str()))
                    .chain(staff.map(|user_id| streams.staff.get(user_id)))
                    .collect(),
                Event::SmsStatus(_) => staff.map(|user_id| streams.staff.get(user_id)).collect(),
            };
            pairs.extend(
                lists
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|sub| (sub.clone(), i)),
            );
        }
        drop(streams);
        pairs.sort_by_key(|(sub, _)| sub.id);
        let now = tokio::time::Instant::now();
        let mut rest = &pairs[..];
        while let Some((sub, _)) = rest.first() {
            let n = rest.iter().take_while(|(s, _)| s.id == sub.id).count();
            let (theirs, after) = rest.split_at(n);
            self.deliver(sub, theirs.iter().map(|(_, i)| &published[*i]), now);
            rest = after;
        }
    }

    /// Delivers one commit's `events` for `sub`: written to its socket by this
    /// publisher when the stream is quiet ([`crate::direct`]), else put into its
    /// channel.
    fn deliver<'e>(
        &self,
        sub: &Sub,
        events: impl Iterator<Item = &'e Arc<Published>> + Clone,
        now: tokio::time::Instant,
    ) {
        if let Some(direct) = sub.direct.get() {
            // Its channel is empty (no permit taken) and it was not ended: checked
            // under the lock that ending a stream takes.
            let quiet = || sub.reason.get().is_none() && sub.tx.capacity() == sub.tx.max_capacity();
            if let Wrote::Events(n) = direct.try_write(quiet, events.clone(), now) {
                let n = n as u64;
                self.inner.metrics.delivered.inc_by(n);
                self.inner.metrics.written_directly.inc_by(n);
                return;
            }
        }
        for event in events {
            self.offer(sub, event);
        }
    }

    /// The staff audience of `patient_id`'s events, when its practice has staff
    /// streams open (`None` otherwise, or when it could not be read).
    async fn audience_if_streams(
        &self,
        patient_id: &str,
        practice_id: &str,
    ) -> Option<Arc<[String]>> {
        if !lock(&self.inner.streams)
            .staff_per_practice
            .contains_key(practice_id)
        {
            return None;
        }
        match self.audience(patient_id).await {
            Ok(audience) => Some(audience),
            Err(err) => {
                // The change is stored; streams miss it, as when they lag.
                tracing::warn!(patient_id, error = %err, "An event's audience could not be read; streams miss it.");
                None
            }
        }
    }

    /// Puts `event` into `sub`'s channel; a full channel ends its stream.
    fn offer(&self, sub: &Sub, event: &Arc<Published>) {
        match sub.tx.try_send(event.clone()) {
            Ok(()) => {
                self.inner.metrics.delivered.inc();
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                sub.end(EndReason::SlowConsumer, &self.inner.metrics);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// The staff users who may see events of `patient_id`'s conversation: its Care
    /// Team panel (members and notification users) who pass the access rule.
    async fn audience(&self, patient_id: &str) -> Result<Arc<[String]>, DbErr> {
        let generation = {
            let audiences = lock(&self.inner.audiences);
            if let Some(found) = audiences.by_patient.get(patient_id) {
                return Ok(found.clone());
            }
            audiences.generation
        };
        let Some(db) = &self.inner.db else {
            return Ok(Arc::from(Vec::new()));
        };
        self.inner.metrics.audience_reads.inc();
        let sql = format!(
            "SELECT ct.user_id FROM care_team_members ct JOIN patients p ON p.id = ct.patient_id \
             WHERE ct.patient_id = ? AND {}",
            crate::access::ACCESSIBLE.replacen('?', "ct.user_id", 1)
        );
        let rows = db
            .query_all_raw(crate::sql::statement(
                db.get_database_backend(),
                &sql,
                vec![patient_id.to_owned().into()],
            ))
            .await?;
        let users: Vec<String> = rows
            .iter()
            .map(|row| row.try_get("", "user_id"))
            .collect::<Result<_, _>>()?;
        let users: Arc<[String]> = Arc::from(users);
        let mut audiences = lock(&self.inner.audiences);
        if audiences.generation == generation {
            if audiences.by_patient.len() >= AUDIENCE_CACHE_MAX {
                audiences.by_patient.clear();
            }
            audiences
                .by_patient
                .insert(patient_id.to_owned(), users.clone());
        }
        Ok(users)
    }

    /// After an admin or notify-me change committed: forgets the audiences it may
    /// change and ends the streams that lost access.
    pub fn access_changed(&self, change: AccessChange<'_>) {
        {
            let mut audiences = lock(&self.inner.audiences);
            audiences.generation += 1;
            match change {
                AccessChange::Patient { id, .. } => {
                    audiences.by_patient.remove(id);
                }
                AccessChange::Panel { patient_id } => {
                    audiences.by_patient.remove(patient_id);
                }
                AccessChange::Practice { .. } | AccessChange::User { .. } => {
                    audiences.by_patient.clear();
                }
            }
        }
        self.end_where(EndReason::AccessRevoked, |who| match (change, who) {
            (
                AccessChange::Practice {
                    id,
                    active,
                    portal_enabled,
                },
                _,
            ) => {
                who.practice_id() == id
                    && (!active || (!portal_enabled && who.scope() == Scope::Portal))
            }
            (AccessChange::User { id, active }, Subscriber::Staff { user_id, .. }) => {
                !active && user_id == id
            }
            (
                AccessChange::Patient {
                    id,
                    active,
                    portal_enrolled,
                },
                Subscriber::Portal { patient_id, .. },
            ) => patient_id == id && !(active && portal_enrolled),
            _ => false,
        });
    }

    /// After a reload: ends the streams whose token is no longer configured with
    /// their scope and practice.
    pub fn revalidate(&self, clients: &[ApiClient]) {
        let still_valid = |sub: &Sub| {
            clients.iter().any(|c| {
                c.name == sub.client
                    && c.token_sha256 == sub.token_sha256
                    && c.scopes.contains(&sub.who.scope())
                    && c.serves(sub.who.practice_id())
            })
        };
        let ended = {
            let mut streams = lock(&self.inner.streams);
            let mut ended = Vec::new();
            for sub in streams
                .staff
                .values()
                .chain(streams.portal.values())
                .flatten()
            {
                if !still_valid(sub) {
                    ended.push(sub.clone());
                }
            }
            for sub in &ended {
                streams.unlist(sub);
            }
            ended
        };
        for sub in ended {
            sub.end(EndReason::CredentialsChanged, &self.inner.metrics);
        }
    }

    fn end_where(&self, reason: EndReason, matches: impl Fn(&Subscriber) -> bool) {
        let ended = {
            let mut streams = lock(&self.inner.streams);
            let ended: Vec<Arc<Sub>> = streams
                .staff
                .values()
                .chain(streams.portal.values())
                .flatten()
                .filter(|s| matches(&s.who))
                .cloned()
                .collect();
            for sub in &ended {
                streams.unlist(sub);
            }
            ended
        };
        for sub in ended {
            sub.end(reason, &self.inner.metrics);
        }
    }
}

/// The credentials a stream was opened with (see [`Events::revalidate`]).
#[derive(Debug, Clone, Copy)]
pub struct ApiClientRef<'a> {
    /// The client's configured name.
    pub name: &'a str,
    /// Its configured token hash.
    pub token_sha256: &'a str,
}

/// An open stream: its channel, until dropped (when its connection ends), which
/// frees its place under the caps.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Arc<Published>>,
    sub: Arc<Sub>,
    hub: Arc<Inner>,
}

impl Subscription {
    /// The next event, or why the stream ends: `Err(None)` when the hub is gone,
    /// `Err(Some(reason))` when the daemon ended it, including after `idle` without
    /// an event.
    #[cfg(test)]
    pub async fn next(&mut self, idle: Duration) -> Result<Arc<Published>, Option<EndReason>> {
        let received = tokio::select! {
            biased;
            () = self.sub.cancel.cancelled() => return Err(self.end_reason()),
            received = tokio::time::timeout(idle, self.rx.recv()) => received,
        };
        match received {
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(None),
            Err(_) => Err(self.end_idle()),
        }
    }

    /// Polls for the next event; `Ready(None)` when the hub is gone.
    pub fn poll_event(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<Arc<Published>>> {
        self.rx.poll_recv(cx)
    }

    /// Completes when the daemon ends this stream ([`Subscription::end_reason`] says
    /// why); made once per stream.
    pub fn ended(&self) -> WaitForCancellationFutureOwned {
        self.sub.cancel.clone().cancelled_owned()
    }

    /// Why the daemon ended this stream, if it did.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.sub.reason.get().copied()
    }

    /// Ends this stream for being idle; returns why it ended (an earlier reason
    /// wins).
    pub fn end_idle(&self) -> Option<EndReason> {
        self.sub.end(EndReason::Idle, &self.hub.metrics);
        self.end_reason()
    }

    /// Whether the daemon ended this stream: events taken after that are not
    /// written.
    pub fn is_ended(&self) -> bool {
        self.sub.cancel.is_cancelled()
    }

    /// Lets the hub write this stream's events to its connection itself when the
    /// stream is quiet ([`crate::direct`]); the stream's body arms `direct`.
    pub fn write_directly(&self, direct: Arc<Direct>) {
        let _ = self.sub.direct.set(direct);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(direct) = self.sub.direct.get() {
            direct.disarm();
        }
        let mut streams = lock(&self.hub.streams);
        streams.unlist(&self.sub);
        streams.total = streams.total.saturating_sub(1);
        decrement(&mut streams.counted, &self.sub.who);
        drop(streams);
        self.hub
            .metrics
            .streams
            .get_or_create(&StreamLabels {
                kind: self.sub.who.kind().to_owned(),
            })
            .dec();
    }
}

/// A notification for `user`, for tests of streams.
#[cfg(test)]
pub(crate) fn test_notification(user: &str) -> Arc<notification::Model> {
    Arc::new(notification::Model {
        id: "n".into(),
        user_id: user.into(),
        kind: caremsg_entities::NotificationKind::NewPatientMessage,
        patient_id: "pat".into(),
        message_seq: None,
        subject: "s".into(),
        sms_status: None,
        read_at: None,
        created_at: chrono::Utc::now(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn hub() -> Events {
        Events::new(None, EventMetrics::default(), 16)
    }

    fn staff(user: &str) -> Subscriber {
        Subscriber::Staff {
            user_id: user.into(),
            practice_id: "p".into(),
        }
    }

    const CLIENT: ApiClientRef<'static> = ApiClientRef {
        name: "c",
        token_sha256: "h",
    };

    fn limits(max_streams: usize, per_subscriber: usize, buffer: usize) -> Limits {
        Limits {
            max_streams,
            per_subscriber,
            buffer,
        }
    }

    fn note(user: &str) -> Arc<notification::Model> {
        super::test_notification(user)
    }

    #[test]
    fn caps_per_subscriber_and_in_total_and_free_on_drop() {
        let events = hub();
        let a1 = events.open(staff("a"), &CLIENT, limits(3, 2, 4)).unwrap();
        let _a2 = events.open(staff("a"), &CLIENT, limits(3, 2, 4)).unwrap();
        assert_eq!(
            events
                .open(staff("a"), &CLIENT, limits(3, 2, 4))
                .unwrap_err(),
            Refused::PerSubscriber
        );
        let _b1 = events.open(staff("b"), &CLIENT, limits(3, 2, 4)).unwrap();
        assert_eq!(
            events
                .open(staff("c"), &CLIENT, limits(3, 2, 4))
                .unwrap_err(),
            Refused::Total
        );
        drop(a1);
        assert_eq!(events.open_streams(), 2);
        events.open(staff("a"), &CLIENT, limits(3, 2, 4)).unwrap();
    }

    #[tokio::test]
    async fn a_slow_consumer_is_dropped_not_buffered() {
        let events = hub();
        let mut slow = events.open(staff("a"), &CLIENT, limits(9, 9, 2)).unwrap();
        for _ in 0..3 {
            events.notify("a".into(), note("a"));
        }
        // Two fitted; the third ended the stream, and what was buffered is not delivered.
        assert_eq!(
            slow.next(Duration::from_secs(5)).await.unwrap_err(),
            Some(EndReason::SlowConsumer)
        );
    }

    #[tokio::test]
    async fn revoked_streams_end_and_others_keep_their_events() {
        let events = hub();
        let mut gone = events.open(staff("a"), &CLIENT, limits(9, 9, 8)).unwrap();
        let mut kept = events.open(staff("b"), &CLIENT, limits(9, 9, 8)).unwrap();
        events.access_changed(AccessChange::User {
            id: "a",
            active: false,
        });
        events.notify("a".into(), note("a"));
        events.notify("b".into(), note("b"));
        assert_eq!(
            gone.next(Duration::from_secs(5)).await.unwrap_err(),
            Some(EndReason::AccessRevoked)
        );
        assert!(kept.next(Duration::from_secs(5)).await.is_ok());
    }

    #[tokio::test]
    async fn an_event_is_rendered_once_for_all_its_streams() {
        let events = hub();
        let mut first = events.open(staff("a"), &CLIENT, limits(9, 9, 8)).unwrap();
        let mut second = events.open(staff("a"), &CLIENT, limits(9, 9, 8)).unwrap();
        events.notify("a".into(), note("a"));
        let renders = AtomicU64::new(0);
        let render = |_: &Event| {
            renders.fetch_add(1, Ordering::Relaxed);
            bytes::Bytes::from_static(b"event: notification\ndata: {}\n\n")
        };
        let wait = Duration::from_secs(5);
        let one = first.next(wait).await.unwrap().wire(render);
        let two = second.next(wait).await.unwrap().wire(render);
        assert_eq!(renders.load(Ordering::Relaxed), 1);
        assert_eq!(one.as_ptr(), two.as_ptr(), "the same bytes, not a copy");
    }

    #[tokio::test]
    async fn a_stream_knows_at_once_that_it_was_ended() {
        let events = hub();
        let stream = events.open(staff("a"), &CLIENT, limits(9, 9, 8)).unwrap();
        assert!(!stream.is_ended());
        events.access_changed(AccessChange::User {
            id: "a",
            active: false,
        });
        assert!(stream.is_ended());
        assert_eq!(stream.end_reason(), Some(EndReason::AccessRevoked));
    }

    #[tokio::test]
    async fn an_idle_stream_ends() {
        let events = hub();
        let mut idle = events.open(staff("a"), &CLIENT, limits(9, 9, 8)).unwrap();
        assert_eq!(
            idle.next(Duration::from_millis(1)).await.unwrap_err(),
            Some(EndReason::Idle)
        );
    }

    #[test]
    fn a_reload_ends_streams_of_tokens_no_longer_listed() {
        let events = hub();
        let sub = events.open(staff("a"), &CLIENT, limits(9, 9, 8)).unwrap();
        let mut client = ApiClient {
            name: "c".into(),
            token_sha256: "h".into(),
            scopes: vec![Scope::Staff],
            practices: None,
        };
        events.revalidate(std::slice::from_ref(&client));
        assert!(sub.sub.reason.get().is_none());
        client.practices = Some(vec!["other".into()]);
        events.revalidate(&[client]);
        assert_eq!(sub.sub.reason.get(), Some(&EndReason::CredentialsChanged));
    }
}
