//! Direct writes: the publisher of an event writes it to a quiet stream's socket
//! itself, instead of waking the stream's task to do it.
//!
//! An event's bytes normally go hub → the stream's channel → its task (woken) →
//! hyper → the socket: a task wake-up, a poll and a flush per stream per commit. For
//! a stream with nothing waiting — its channel empty, its task parked with nothing
//! held, hyper with nothing buffered, outside its coalescing spell — the hub instead
//! frames the commit's events for that stream as one HTTP/1.1 chunk and writes it to
//! the socket: one `write` and no task woken. Everything else (keep-alives, the `end`
//! event, bursts within a spell, a stream that is behind) takes the task path as
//! before, and the two never interleave, because three parties share one lock per
//! connection ([`Direct`]):
//!
//! - **the connection's IO** (`http::Watched`): hyper's writes mark hyper busy; hyper
//!   flushes its IO exactly when its write buffer is empty, which marks it idle (and,
//!   the first time after arming, duplicates the socket for the hub). Before any byte
//!   of hyper's it writes what a direct write left unwritten (the backlog).
//! - **the stream's body** (`EventChunks` in [`crate::api::conversation`]): arms it
//!   on its first poll (hyper has the response head then), marks itself busy at the
//!   start of every poll and idle when it parks holding nothing, marks hyper busy when
//!   it hands hyper a chunk, and disarms it when it ends. At each poll it takes the
//!   time of the last direct write, so its keep-alive and idle end count them.
//! - **the hub** ([`crate::events`]): writes only when the stream is armed, both of
//!   the above are idle, no backlog waits, the stream's channel is empty and the
//!   stream was not ended (ending a stream takes this lock).
//!
//! A write that goes out in part (or not at all: the socket is full) leaves the rest
//! as the backlog, at most one chunk: no direct write is made while it waits, and the
//! connection's task is woken so that its IO writes it before anything else. A
//! consumer that stops reading then falls behind on its channel as before and ends
//! `slow_consumer`.
//!
//! Only a GET over HTTP/1.1 is armed ([`StreamSocket`]): its body is chunked. A HEAD
//! has no body and an HTTP/1.0 body is not chunked; both keep the task path.
//!
//! **Architecture Invariant:** the bytes on a stream's connection are exactly hyper's
//! bytes with whole chunks of the hub's inserted between hyper's writes, never within
//! one, and none after the stream ended.

use std::fmt::Write as _;
use std::io::Write;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Method, Version};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::events::{Event, Published};

/// How a stream shows and renders its events: what its body would do with them.
#[derive(Debug, Clone, Copy)]
pub struct Armed {
    /// Whether the stream shows an event.
    pub shows: fn(&Event) -> bool,
    /// An event's wire form (the SSE bytes).
    pub render: fn(&Event) -> Bytes,
    /// Events within this long of the stream's last write of events wait for its task.
    pub coalesce: Duration,
}

/// One connection's direct-write state, shared by its IO, the stream served on it,
/// and the hub (see the module's documentation).
#[derive(Debug, Default)]
pub struct Direct {
    // Once armed, the IO takes the lock on every write (a plain connection never does).
    engaged: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    // The stream served now; `None`: no stream, or it ended.
    stream: Option<Armed>,
    // The socket, duplicated by the IO at its first flush after arming; closed when
    // the stream ends or the connection does.
    sock: Option<std::net::TcpStream>,
    // hyper has nothing buffered (its last IO call was a flush).
    hyper_idle: bool,
    // The stream's task is parked holding nothing.
    task_idle: bool,
    // What a direct write left unwritten: written by the IO before hyper's bytes.
    backlog: Bytes,
    // Wakes the connection's task (the stream's body is polled in it).
    waker: Option<Waker>,
    // The stream's last write of events, by its task or the hub.
    last_events_write: Option<Instant>,
}

/// The lock of a connection's direct writes, held while a stream is ended.
#[derive(Debug)]
pub struct Held<'a>(#[allow(dead_code)] MutexGuard<'a, State>);

/// What [`Direct::try_write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrote {
    /// The events are on the socket, or in the backlog that goes before anything else.
    Events(usize),
    /// The stream is not quiet (or not armed): offer the events to its channel.
    NotQuiet,
}

impl Direct {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds the lock: no direct write happens meanwhile.
    pub fn hold(&self) -> Held<'_> {
        Held(self.lock())
    }

    // The IO's side.

    /// Whether the IO must call [`Direct::poll_before_write`] and
    /// [`Direct::poll_flushed`] (a stream was armed on this connection).
    pub fn engaged(&self) -> bool {
        self.engaged.load(Ordering::Acquire)
    }

    /// Before hyper writes (or shuts down): writes the backlog first, and marks hyper
    /// busy.
    pub fn poll_before_write(
        &self,
        io: Pin<&mut TcpStream>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut state = self.lock();
        ready!(state.poll_backlog(io, cx))?;
        state.hyper_idle = false;
        Poll::Ready(Ok(()))
    }

    /// hyper flushes: its buffer is empty. Writes the backlog first; duplicates the
    /// socket for the hub the first time after arming.
    pub fn poll_flushed(
        &self,
        mut io: Pin<&mut TcpStream>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut state = self.lock();
        ready!(state.poll_backlog(io.as_mut(), cx))?;
        if state.stream.is_some() && state.sock.is_none() {
            match duplicate(io.as_fd()) {
                Ok(fd) => state.sock = Some(std::net::TcpStream::from(fd)),
                // Out of descriptors, say: this stream keeps the task path.
                Err(error) => {
                    tracing::debug!(%error, "A stream's socket could not be duplicated.");
                    state.stream = None;
                }
            }
        }
        state.hyper_idle = true;
        Poll::Ready(Ok(()))
    }

    /// The connection ends: nothing is written to it any more.
    pub fn close(&self) {
        let mut state = self.lock();
        state.stream = None;
        state.sock = None;
        state.backlog = Bytes::new();
    }

    // The stream's side.

    /// The stream's first poll: hyper has its response head, not yet written.
    pub fn arm(&self, armed: Armed, last_events_write: Instant) {
        let mut state = self.lock();
        state.stream = Some(armed);
        state.hyper_idle = false;
        state.task_idle = false;
        state.last_events_write = Some(last_events_write);
        drop(state);
        self.engaged.store(true, Ordering::Release);
    }

    /// The start of a poll of the stream: it is busy. Returns its last write of
    /// events, which may be a direct one.
    pub fn polling(&self) -> Option<Instant> {
        let mut state = self.lock();
        state.task_idle = false;
        state.last_events_write
    }

    /// The stream parks; `idle` when it holds nothing to write.
    pub fn parked(&self, idle: bool, waker: &Waker) {
        let mut state = self.lock();
        state.task_idle = idle;
        if !state.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            state.waker = Some(waker.clone());
        }
    }

    /// The stream hands hyper a chunk (hyper is busy until it flushed it); its last
    /// write of events is `last_events_write`.
    pub fn handing(&self, last_events_write: Instant) {
        let mut state = self.lock();
        state.hyper_idle = false;
        state.last_events_write = state.last_events_write.max(Some(last_events_write));
    }

    /// The stream ended: no direct write any more (a backlog is still written first).
    pub fn disarm(&self) {
        let mut state = self.lock();
        state.stream = None;
        state.sock = None;
    }

    // The hub's side.

    /// Writes one commit's `events` for this stream as one chunk, when the stream is
    /// armed and quiet and `quiet` (checked under the lock: the stream's channel is
    /// empty and it was not ended) holds, at `now`.
    pub fn try_write<'e>(
        &self,
        quiet: impl FnOnce() -> bool,
        events: impl Iterator<Item = &'e Arc<Published>> + Clone,
        now: Instant,
    ) -> Wrote {
        let mut state = self.lock();
        let (Some(armed), Some(sock)) = (state.stream, &state.sock) else {
            return Wrote::NotQuiet;
        };
        let in_spell = state
            .last_events_write
            .is_some_and(|at| now < at + armed.coalesce);
        if !state.hyper_idle
            || !state.task_idle
            || !state.backlog.is_empty()
            || in_spell
            || !quiet()
        {
            return Wrote::NotQuiet;
        }
        let shown = events.filter(|e| (armed.shows)(&e.event));
        let wires: Vec<Bytes> = shown.map(|e| e.wire(armed.render)).collect();
        let len: usize = wires.iter().map(Bytes::len).sum();
        if len == 0 {
            // Nothing it shows: its task takes them (they count as received).
            return Wrote::NotQuiet;
        }
        let chunk = chunk(&wires, len);
        let written = match (&*sock).write(&chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(error) => {
                // The connection is broken: hyper finds out on its next write.
                tracing::debug!(%error, "A direct write to a stream failed.");
                state.stream = None;
                state.sock = None;
                return Wrote::NotQuiet;
            }
        };
        if written < chunk.len() {
            state.backlog = chunk.slice(written..);
            if let Some(waker) = &state.waker {
                waker.wake_by_ref();
            }
        }
        state.last_events_write = Some(now);
        Wrote::Events(wires.len())
    }
}

impl State {
    /// Writes the backlog to `io`.
    fn poll_backlog(
        &mut self,
        mut io: Pin<&mut TcpStream>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        while !self.backlog.is_empty() {
            let n = ready!(io.as_mut().poll_write(cx, &self.backlog))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.backlog.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

/// A second descriptor of the stream's socket, for the hub.
fn duplicate(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<std::os::fd::OwnedFd> {
    #[cfg(test)]
    if tests::OUT_OF_DESCRIPTORS.get() {
        return Err(std::io::Error::from_raw_os_error(24)); // EMFILE
    }
    fd.try_clone_to_owned()
}

/// `wires` (`len` bytes in all) as one HTTP/1.1 chunk: size in hex, CRLF, the bytes,
/// CRLF.
fn chunk(wires: &[Bytes], len: usize) -> Bytes {
    let mut chunk = BytesMut::with_capacity(len + 20);
    // Writing to a BytesMut cannot fail.
    let _ = write!(chunk, "{len:X}\r\n");
    for wire in wires {
        chunk.put_slice(wire);
    }
    chunk.put_slice(b"\r\n");
    chunk.freeze()
}

/// The connection's [`Direct`], for a request whose response body is chunked (a GET
/// over HTTP/1.1); `None` for any other.
#[derive(Debug, Clone)]
pub struct StreamSocket(pub Option<Arc<Direct>>);

impl<S: Send + Sync> FromRequestParts<S> for StreamSocket {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let chunked = parts.method == Method::GET && parts.version == Version::HTTP_11;
        Ok(Self(
            parts
                .extensions
                .get::<Arc<Direct>>()
                .filter(|_| chunked)
                .cloned(),
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Read;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;

    thread_local! {
        /// Duplicating a socket fails, as when the process is out of descriptors.
        pub(super) static OUT_OF_DESCRIPTORS: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
    }

    /// A connected pair of loopback sockets: the daemon's side (as hyper's IO has it)
    /// and a client's, which reads without blocking.
    pub(crate) async fn socket_pair() -> (TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_nonblocking(true).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (TcpStream::from_std(server).unwrap(), client)
    }

    /// What `client` can read now.
    pub(crate) fn read_now(client: &mut std::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return got,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// hyper flushes its (empty) buffer: the IO's flush, once.
    pub(crate) fn hyper_flushes(direct: &Direct, io: &mut TcpStream) -> Poll<std::io::Result<()>> {
        let waker = Waker::noop();
        direct.poll_flushed(Pin::new(io), &mut Context::from_waker(waker))
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn event(pad: usize) -> Arc<Published> {
        let mut note = crate::events::test_notification("a");
        Arc::make_mut(&mut note).patient_id = "p".repeat(pad);
        Published::new(Event::Notification {
            user_id: "a".into(),
            notification: note,
        })
    }

    const ARMED: Armed = Armed {
        shows: |_| true,
        render: crate::api::conversation::wire,
        coalesce: Duration::from_millis(100),
    };

    /// A direct writer armed on `io` with both its parties idle.
    fn quiet(io: &mut TcpStream, wakes: &Arc<Wakes>) -> Direct {
        let direct = Direct::default();
        direct.arm(ARMED, Instant::now() - Duration::from_secs(1));
        direct.parked(true, &Waker::from(wakes.clone()));
        assert!(hyper_flushes(&direct, io).is_ready());
        direct
    }

    #[tokio::test]
    async fn a_quiet_stream_gets_one_whole_chunk_per_commit() {
        let (mut io, mut client) = socket_pair().await;
        let wakes = Arc::new(Wakes::default());
        let direct = quiet(&mut io, &wakes);
        let (one, two) = (event(3), event(4));
        let wrote = direct.try_write(|| true, [&one, &two].into_iter(), Instant::now());
        assert_eq!(wrote, Wrote::Events(2));
        let mut expected = one.wire(crate::api::conversation::wire).to_vec();
        expected.extend_from_slice(&two.wire(crate::api::conversation::wire));
        let got = read_now(&mut client);
        let head = format!("{:X}\r\n", expected.len());
        assert_eq!(&got[..head.len()], head.as_bytes());
        assert_eq!(&got[head.len()..got.len() - 2], &expected[..]);
        assert_eq!(&got[got.len() - 2..], b"\r\n");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0, "no task woken");
    }

    #[tokio::test]
    async fn nothing_is_written_directly_unless_every_party_is_quiet() {
        let (mut io, mut client) = socket_pair().await;
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let e = event(3);
        let now = Instant::now();
        let write = |direct: &Direct, quiet: bool, at: Instant| {
            direct.try_write(|| quiet, std::iter::once(&e), at)
        };

        // Not armed (no stream, or not a chunked one).
        let direct = Direct::default();
        assert_eq!(write(&direct, true, now), Wrote::NotQuiet);
        // Armed, but hyper has not flushed its response head yet.
        direct.arm(ARMED, now - Duration::from_secs(1));
        direct.parked(true, &waker);
        assert_eq!(write(&direct, true, now), Wrote::NotQuiet);
        // Flushed: quiet.
        assert!(hyper_flushes(&direct, &mut io).is_ready());
        assert_eq!(write(&direct, true, now), Wrote::Events(1));
        // Within the coalescing spell of that write: the task's.
        assert_eq!(
            write(&direct, true, now + Duration::from_millis(99)),
            Wrote::NotQuiet
        );
        let later = now + Duration::from_secs(1);
        // Its channel holds events, or it was ended (the hub's `quiet`).
        assert_eq!(write(&direct, false, later), Wrote::NotQuiet);
        // Its task is in a poll, or parked holding events.
        direct.polling();
        assert_eq!(write(&direct, true, later), Wrote::NotQuiet);
        direct.parked(false, &waker);
        assert_eq!(write(&direct, true, later), Wrote::NotQuiet);
        direct.parked(true, &waker);
        // It handed hyper a chunk hyper has not flushed.
        direct.handing(later);
        assert_eq!(
            write(&direct, true, later + Duration::from_secs(1)),
            Wrote::NotQuiet
        );
        assert!(hyper_flushes(&direct, &mut io).is_ready());
        let after = later + Duration::from_secs(1);
        assert_eq!(write(&direct, true, after), Wrote::Events(1));
        // Ended, or its connection closed.
        direct.disarm();
        assert_eq!(
            write(&direct, true, after + Duration::from_secs(1)),
            Wrote::NotQuiet
        );
        let two = read_now(&mut client);
        assert_eq!(
            two.len(),
            2 * chunk(&[e.wire(ARMED.render)], e.wire(ARMED.render).len()).len()
        );
        let closed = quiet(&mut io, &wakes);
        closed.close();
        assert_eq!(write(&closed, true, after), Wrote::NotQuiet);
        // The shown filter: nothing shown is the task's to count.
        let hidden = quiet(&mut io, &wakes);
        hidden.arm(
            Armed {
                shows: |_| false,
                ..ARMED
            },
            now - Duration::from_secs(1),
        );
        hidden.parked(true, &waker);
        assert!(hyper_flushes(&hidden, &mut io).is_ready());
        assert_eq!(write(&hidden, true, after), Wrote::NotQuiet);
        assert!(read_now(&mut client).is_empty());
    }

    #[tokio::test]
    async fn a_write_the_socket_cannot_take_whole_waits_and_goes_before_anything_else() {
        let (mut io, mut client) = socket_pair().await;
        let wakes = Arc::new(Wakes::default());
        let direct = quiet(&mut io, &wakes);
        // Write until the socket (the client reads nothing) takes a write in part or
        // not at all: its task is woken for the rest, and no direct write follows.
        let big = event(60_000);
        let mut at = Instant::now();
        let mut written = 0;
        while wakes.0.load(Ordering::Relaxed) == 0 {
            assert!(written < 10_000, "the socket never filled");
            assert_eq!(
                direct.try_write(|| true, std::iter::once(&big), at),
                Wrote::Events(1)
            );
            written += 1;
            at += Duration::from_secs(1);
        }
        assert_eq!(
            direct.try_write(|| true, std::iter::once(&big), at),
            Wrote::NotQuiet,
            "a backlog waits"
        );
        // The task, woken, finds nothing new; hyper then flushes, which writes the
        // backlog as far as the socket takes it; hyper's own next bytes wait for all
        // of it, and go out after it.
        let mut got = Vec::new();
        loop {
            let flushed = std::future::poll_fn(|cx| {
                Poll::Ready(direct.poll_before_write(Pin::new(&mut io), cx))
            })
            .await;
            if flushed.is_ready() {
                break;
            }
            got.extend(read_now(&mut client));
            // Lets the runtime see the socket writable again.
            tokio::task::yield_now().await;
        }
        let hypers = b"1\r\nh\r\n";
        let mut left = &hypers[..];
        while !left.is_empty() {
            match io.try_write(left) {
                Ok(n) => left = &left[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    got.extend(read_now(&mut client));
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        got.extend(read_now(&mut client));
        let one = chunk(&[big.wire(ARMED.render)], big.wire(ARMED.render).len());
        assert_eq!(got.len(), written * one.len() + hypers.len());
        for i in 0..written {
            assert_eq!(
                &got[i * one.len()..(i + 1) * one.len()],
                &one[..],
                "chunk {i}"
            );
        }
        assert!(got.ends_with(hypers));
        // Quiet again once hyper flushed.
        assert!(hyper_flushes(&direct, &mut io).is_ready());
        direct.parked(true, &Waker::from(wakes.clone()));
        assert_eq!(
            direct.try_write(|| true, std::iter::once(&big), at),
            Wrote::Events(1)
        );
    }

    #[test]
    fn a_chunk_is_framed_as_hyper_frames_one() {
        for len in [1usize, 9, 10, 15, 16, 255, 256, 4_095, 65_536, 1_000_003] {
            let body = Bytes::from(vec![b'x'; len]);
            let framed = chunk(std::slice::from_ref(&body), len);
            let expected = format!("{len:X}\r\n");
            assert!(framed.starts_with(expected.as_bytes()), "{len}");
            assert_eq!(framed.len(), expected.len() + len + 2);
            assert!(framed.ends_with(b"x\r\n"));
        }
        let two = chunk(&[Bytes::from_static(b"ab"), Bytes::from_static(b"c")], 3);
        assert_eq!(&two[..], b"3\r\nabc\r\n");
    }

    #[tokio::test]
    async fn a_connection_reset_by_its_client_disarms_the_stream() {
        let (mut io, client) = socket_pair().await;
        let wakes = Arc::new(Wakes::default());
        let direct = quiet(&mut io, &wakes);
        // The client goes away with a reset (a crashed app, a killed proxy).
        let client = TcpStream::from_std(client).unwrap();
        client.set_zero_linger().unwrap();
        drop(client);
        let e = event(3);
        let now = Instant::now();
        // The write fails (a reset, or a broken pipe): the events go to the stream's
        // channel, where its task and hyper meet the error and end the connection.
        assert_eq!(
            direct.try_write(|| true, std::iter::once(&e), now),
            Wrote::NotQuiet
        );
        // Disarmed: no further write is tried, and nothing waits to be written.
        assert_eq!(
            direct.try_write(|| true, std::iter::once(&e), now + Duration::from_secs(1)),
            Wrote::NotQuiet
        );
        assert!(direct.lock().backlog.is_empty());
        assert!(direct.lock().stream.is_none() && direct.lock().sock.is_none());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_stream_whose_socket_cannot_be_duplicated_keeps_the_task_path() {
        let (mut io, mut client) = socket_pair().await;
        let wakes = Arc::new(Wakes::default());
        let direct = Direct::default();
        direct.arm(ARMED, Instant::now() - Duration::from_secs(1));
        direct.parked(true, &Waker::from(wakes.clone()));
        // Out of descriptors at hyper's first flush after arming.
        OUT_OF_DESCRIPTORS.set(true);
        let flushed = hyper_flushes(&direct, &mut io);
        OUT_OF_DESCRIPTORS.set(false);
        // hyper's flush itself succeeds: the connection goes on, on the task path.
        assert!(matches!(flushed, Poll::Ready(Ok(()))));
        let e = event(3);
        assert_eq!(
            direct.try_write(|| true, std::iter::once(&e), Instant::now()),
            Wrote::NotQuiet
        );
        // Disarmed for good: a later flush does not duplicate and arm it again.
        assert!(hyper_flushes(&direct, &mut io).is_ready());
        assert!(direct.lock().stream.is_none() && direct.lock().sock.is_none());
        assert!(read_now(&mut client).is_empty(), "nothing written directly");
    }
}
