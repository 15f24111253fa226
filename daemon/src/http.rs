//! The HTTP server's connection loop: HTTP/1.1 over TCP, with the bounds axum's own
//! `serve` does not set.
//!
//! - **Header-read timeout** (`server.header_read_timeout`): once the first byte of a
//!   request arrives, its head (request line and headers) must be complete within it.
//! - **Idle timeout** (`server.idle_timeout`): a connection with no request in
//!   progress — new and silent, or kept alive between requests — is closed after it.
//! - **Send timeout** (`server.send_timeout`): a connection whose client stopped
//!   reading — none of a response's or an event stream's bytes could be written for
//!   that long, the socket's buffer full — is closed, whatever the request. So a
//!   client that never reads what it asked for does not hold a connection forever.
//! - **Connection cap** (`server.max_connections`): a connection accepted past the cap
//!   closes the longest-idle connection that has no request in progress; when every
//!   connection is busy, the next `accept` waits until one ends (new connections wait
//!   in the kernel's listen backlog). So an idle crowd never locks out `/healthz`.
//!
//! A request is "in progress" from the moment its head is parsed until its response
//! body has been sent (an event stream is in progress as long as it is open), so
//! neither the header-read nor the idle timeout ever cuts a request or a stream;
//! `server.request_timeout` bounds handlers, the send timeout a client that does not
//! read. Every setting is read at each use: a reload applies to open connections too.
//! `caremsg_http_connections_closed_total` counts the connections each bound closed.
//!
//! **Architecture Invariant:** the number of open client connections never exceeds
//! `server.max_connections` + 1 (the one just accepted, while the loop makes room).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use caremsg_config::Settings;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::direct::Direct;
use crate::metrics::CloseLabels;

/// What a connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in progress and no byte of the next one yet.
    Idle = 0,
    /// Bytes of a request's head arrived; the head is not complete.
    Head = 1,
    /// A request is in progress (its response not fully sent).
    Busy = 2,
}

/// Why the server closed a connection (the `reason` of
/// `caremsg_http_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    HeaderRead,
    Idle,
    Send,
    Evicted,
}

impl Closed {
    fn as_str(self) -> &'static str {
        match self {
            Closed::HeaderRead => "header_read_timeout",
            Closed::Idle => "idle_timeout",
            Closed::Send => "send_timeout",
            Closed::Evicted => "evicted",
        }
    }
}

/// The shared state of one connection: what it is doing and since when.
struct Conn {
    phase: AtomicU8,
    requests: AtomicUsize,
    since: Mutex<Instant>,
    // When the connection was opened, and since when (nanoseconds after that, plus
    // one; 0: not stalled) no byte could be written, the client not reading.
    opened: Instant,
    stalled: AtomicU64,
    changed: Notify,
    evict: CancellationToken,
}

impl Conn {
    fn new() -> Self {
        Self {
            phase: AtomicU8::new(Phase::Idle as u8),
            requests: AtomicUsize::new(0),
            since: Mutex::new(Instant::now()),
            opened: Instant::now(),
            stalled: AtomicU64::new(0),
            changed: Notify::new(),
            evict: CancellationToken::new(),
        }
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Idle,
            1 => Phase::Head,
            _ => Phase::Busy,
        }
    }

    fn since(&self) -> Instant {
        *self.since.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self, phase: Phase) {
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.phase.store(phase as u8, Ordering::Release);
        self.changed.notify_one();
    }

    /// Bytes arrived: on an idle connection, the head of a request has begun.
    fn bytes_read(&self) {
        if self
            .phase
            .compare_exchange(
                Phase::Idle as u8,
                Phase::Head as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.enter(Phase::Busy);
    }

    fn request_ended(&self) {
        if self.requests.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.enter(Phase::Idle);
        }
    }

    /// When this connection is to be closed, if nothing happens before.
    fn deadline(&self, settings: &Settings) -> Option<(Instant, Closed)> {
        let server = &settings.server;
        let phase = match self.phase() {
            Phase::Idle => Some((self.since() + server.idle_timeout, Closed::Idle)),
            Phase::Head => Some((
                self.since() + server.header_read_timeout,
                Closed::HeaderRead,
            )),
            Phase::Busy => None,
        };
        let stalled = match self.stalled.load(Ordering::Acquire) {
            0 => None,
            at => Some((
                self.opened + Duration::from_nanos(at - 1) + server.send_timeout,
                Closed::Send,
            )),
        };
        [phase, stalled]
            .into_iter()
            .flatten()
            .min_by_key(|(at, _)| *at)
    }

    /// Passes on the outcome of a write (or flush, or shutdown) of the connection,
    /// noting it: `Pending` means the socket is full, the client not reading; anything
    /// else, that it moves. Only the connection's own task writes, so the load and
    /// the store below do not race.
    fn wrote<T>(&self, poll: Poll<T>) -> Poll<T> {
        let stalled = self.stalled.load(Ordering::Acquire);
        match (&poll, stalled) {
            (Poll::Pending, 0) => {
                let at = Instant::now().saturating_duration_since(self.opened);
                let at = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX - 1);
                self.stalled.store(at + 1, Ordering::Release);
                self.changed.notify_one();
            }
            (Poll::Ready(_), 1..) => self.stalled.store(0, Ordering::Release),
            _ => {}
        }
        poll
    }
}

/// Marks the end of a request when its response body is dropped (sent or abandoned).
struct RequestGuard(Arc<Conn>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// The TCP stream, telling its connection when bytes arrive, and sharing its writes
/// with the hub's direct writes to an event stream served on it ([`Direct`]).
struct Watched {
    stream: TcpStream,
    conn: Arc<Conn>,
    direct: Arc<Direct>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.direct.close();
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.bytes_read();
        }
        result
    }
}

impl Watched {
    /// One write of hyper's: what a direct write left goes first. Each write and flush
    /// is noted by the connection ([`Conn::wrote`]).
    fn write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        let poll = (|| {
            if self.direct.engaged() {
                ready!(
                    self.direct
                        .poll_before_write(Pin::new(&mut self.stream), cx)
                )?;
            }
            write(Pin::new(&mut self.stream), cx)
        })();
        self.conn.wrote(poll)
    }

    /// hyper flushes (its buffer is empty): what a direct write left goes out.
    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = (|| {
            if self.direct.engaged() {
                ready!(self.direct.poll_flushed(Pin::new(&mut self.stream), cx))?;
            }
            Pin::new(&mut self.stream).poll_flush(cx)
        })();
        self.conn.wrote(poll)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |stream, cx| stream.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // hyper flushes its IO only when its own buffer is empty.
        self.get_mut().flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut()
            .write_with(cx, |stream, cx| stream.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |stream, cx| stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The open connections, by number.
#[derive(Default)]
struct Registry {
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    ended: Notify,
}

impl Registry {
    fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn insert(&self, id: u64, conn: Arc<Conn>) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, conn);
    }

    fn remove(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.ended.notify_one();
    }

    /// Closes the connection idle the longest (no request in progress); false when
    /// every connection is busy.
    fn evict_one(&self) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let victim = open
            .iter()
            .filter(|(_, c)| c.phase() != Phase::Busy)
            .min_by_key(|(_, c)| c.since())
            .map(|(id, _)| *id);
        match victim.and_then(|id| open.remove(&id)) {
            Some(conn) => {
                conn.evict.cancel();
                true
            }
            None => false,
        }
    }
}

/// Serves `app` on `listener` until `stop` is cancelled, then lets in-flight requests
/// finish (the caller bounds how long) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: Arc<ArcSwap<Settings>>,
    closed: Family<CloseLabels, Counter>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let registry = Arc::new(Registry::default());
    let mut tasks = JoinSet::new();
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = tasks.join_next() => continue,
            () = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, or a connection reset before it was
                // accepted: back off briefly rather than spin.
                tracing::warn!(%error, "Accepting a connection failed.");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    () = stop.cancelled() => break,
                }
                continue;
            }
        };
        // Make room for it: close the longest-idle connection, or wait until one ends
        // (the next `accept` waits meanwhile, so new connections queue in the backlog).
        let mut stopped = false;
        while registry.len() >= settings.load().server.max_connections.max(1) {
            if registry.evict_one() {
                tracing::debug!(
                    "The connection cap is reached; an idle connection was closed to make room."
                );
                continue;
            }
            tokio::select! {
                () = registry.ended.notified() => {}
                Some(_) = tasks.join_next() => {}
                () = stop.cancelled() => {
                    stopped = true;
                    break;
                }
            }
        }
        if stopped {
            break;
        }
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let conn = Arc::new(Conn::new());
        registry.insert(id, conn.clone());
        let task = serve_connection(
            stream,
            peer,
            app.clone(),
            conn,
            settings.clone(),
            closed.clone(),
            stop.clone(),
        );
        let registry = registry.clone();
        tasks.spawn(async move {
            task.await;
            registry.remove(id);
        });
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Serves one connection until the client closes it, a timeout or eviction closes it,
/// or the daemon stops (then the request in progress finishes first).
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    conn: Arc<Conn>,
    settings: Arc<ArcSwap<Settings>>,
    closed: Family<CloseLabels, Counter>,
    stop: CancellationToken,
) {
    let count = |why: Closed| {
        closed
            .get_or_create(&CloseLabels {
                reason: why.as_str().to_owned(),
            })
            .inc();
    };
    let direct = Arc::new(Direct::default());
    let service = {
        let conn = conn.clone();
        let direct = direct.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            conn.request_started();
            let guard = RequestGuard(conn.clone());
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(direct.clone());
            let app = app.clone();
            async move {
                let response = app.oneshot(request.map(Body::new)).await?;
                Ok::<_, Infallible>(response.map(move |body| {
                    Body::new(body.map_frame(move |frame| {
                        let _in_progress = &guard;
                        frame
                    }))
                }))
            }
        })
    };
    let io = TokioIo::new(Watched {
        stream,
        conn: conn.clone(),
        direct,
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.header_read_timeout(None).keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        let deadline = if stopping {
            None
        } else {
            conn.deadline(&settings.load())
        };
        let expired = async {
            match deadline {
                Some((deadline, _)) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "A connection ended with an error.");
                }
                return;
            }
            () = conn.changed.notified() => {}
            () = expired => {
                // Still the same phase since the deadline was computed (else
                // `changed` would have fired first, or the new deadline is later).
                if let Some((_, why)) = conn
                    .deadline(&settings.load())
                    .filter(|(at, _)| *at <= Instant::now())
                {
                    tracing::debug!(phase = ?conn.phase(), reason = why.as_str(), "A connection timed out and was closed.");
                    count(why);
                    return;
                }
            }
            () = conn.evict.cancelled() => {
                count(Closed::Evicted);
                return;
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(idle: u64, send: u64) -> Settings {
        let mut settings = Settings::default();
        settings.server.idle_timeout = Duration::from_secs(idle);
        settings.server.send_timeout = Duration::from_secs(send);
        settings
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_has_a_deadline_only_while_its_writes_are_stalled() {
        let conn = Conn::new();
        let settings = settings(60, 30);
        conn.request_started();
        assert_eq!(conn.deadline(&settings), None, "a request in progress");
        // A write that went out: still none.
        let _ = conn.wrote(Poll::Ready(()));
        assert_eq!(conn.deadline(&settings), None);
        // The socket is full: the send timeout counts from the first refused write.
        let stalled = Instant::now();
        let _ = conn.wrote(Poll::<()>::Pending);
        tokio::time::advance(Duration::from_secs(10)).await;
        let _ = conn.wrote(Poll::<()>::Pending);
        assert_eq!(
            conn.deadline(&settings),
            Some((stalled + Duration::from_secs(30), Closed::Send))
        );
        // A byte goes out: the count starts again at the next stall.
        let _ = conn.wrote(Poll::Ready(()));
        assert_eq!(conn.deadline(&settings), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        let again = Instant::now();
        let _ = conn.wrote(Poll::<()>::Pending);
        assert_eq!(
            conn.deadline(&settings),
            Some((again + Duration::from_secs(30), Closed::Send))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_that_is_stalled_too_closes_at_the_sooner_bound() {
        let conn = Conn::new();
        let idle_since = Instant::now();
        // Its last response's bytes do not go out.
        let _ = conn.wrote(Poll::<()>::Pending);
        assert_eq!(
            conn.deadline(&settings(60, 30)),
            Some((idle_since + Duration::from_secs(30), Closed::Send))
        );
        assert_eq!(
            conn.deadline(&settings(10, 30)),
            Some((idle_since + Duration::from_secs(10), Closed::Idle))
        );
    }
}
