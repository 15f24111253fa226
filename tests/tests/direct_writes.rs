//! Direct writes (issue #15, the 2,000-streams target): the publisher of an event
//! writes it to a quiet event stream's socket itself. These tests read staff streams
//! as raw bytes off a real connection to a real daemon and parse the chunked body
//! strictly, so a direct chunk written inside one of hyper's writes, out of order,
//! twice, or after the stream's `end` fails them; they also hold the paths where it
//! breaks: a reader that stops reading until the socket fills, an end racing the
//! publisher, an HTTP/1.0 client (no chunks) and a daemon that stops mid-stream.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use caremsg_entities::{NotificationKind, notification};
use caremsg_tests::{STAFF_TOKEN, TestDaemon};
use caremsgd::events::{AccessChange, ReasonLabels};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any step here may take before the test fails.
const BOUND: Duration = Duration::from_secs(20);

/// A daemon with `[events]` as given.
async fn daemon(events: &str) -> TestDaemon {
    daemon_with("", events).await
}

/// A daemon with `server` added to `[server]` and `[events]` as given.
async fn daemon_with(server: &str, events: &str) -> TestDaemon {
    let d = TestDaemon::start_with(|text| {
        text.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:0\"\n{server}"),
        )
        .replace("[sms_auth]", &format!("[events]\n{events}\n\n[sms_auth]"))
    })
    .await
    .unwrap();
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    d
}

/// Notification number `n` for `user`, its patient id `pad` bytes long.
fn note(user: &str, n: usize, pad: usize) -> Arc<notification::Model> {
    Arc::new(notification::Model {
        id: format!("n{n}"),
        user_id: user.into(),
        kind: NotificationKind::NewPatientMessage,
        patient_id: "p".repeat(pad),
        message_seq: None,
        subject: "s".into(),
        sms_status: None,
        read_at: None,
        created_at: chrono::Utc::now(),
    })
}

fn publish(d: &TestDaemon, user: &str, n: usize, pad: usize) {
    d.daemon()
        .state()
        .events
        .notify(user.into(), note(user, n, pad));
}

/// Streams ended as slow consumers.
fn ended_slow(d: &TestDaemon) -> u64 {
    d.daemon()
        .state()
        .metrics
        .events
        .ended
        .get_or_create(&ReasonLabels {
            reason: "slow_consumer".into(),
        })
        .get()
}

/// Connections the daemon closed because their client read nothing for
/// `server.send_timeout`.
fn closed_for_not_reading(d: &TestDaemon) -> u64 {
    d.connections_closed("send_timeout")
}

/// Publishes to `u1` without reading until its stream is ended as a slow consumer:
/// direct writes fill the socket, the last one in part, then hyper's buffer, then the
/// channel. Returns the events published.
async fn publish_until_ended_slow(d: &TestDaemon) -> usize {
    let mut published = 0;
    while ended_slow(d) == 0 {
        assert!(published < 200_000, "never ended as a slow consumer");
        publish(d, "u1", published, 1_000);
        published += 1;
        if published % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    published
}

fn written_directly(d: &TestDaemon) -> u64 {
    d.daemon().state().metrics.events.written_directly.get()
}

/// Opens `u1`'s staff stream over `version` on `stream` and reads the response head;
/// returns it and whatever of the body came with it.
async fn open_on(stream: &mut TcpStream, version: &str) -> (String, Vec<u8>) {
    let request = format!(
        "GET /v1/staff/events {version}\r\nHost: caremsg\r\nAuthorization: Bearer {STAFF_TOKEN}\r\nX-Caremsg-User: u1\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(got[..end].to_vec()).unwrap();
            return (head, got[end + 4..].to_vec());
        }
        let n = tokio::time::timeout(BOUND, stream.read(&mut buf))
            .await
            .expect("a response head in time")
            .unwrap();
        assert!(n > 0, "closed before the head");
        got.extend_from_slice(&buf[..n]);
    }
}

async fn open(d: &TestDaemon) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(d.daemon().local_addr()).await.unwrap();
    let (head, rest) = open_on(&mut stream, "HTTP/1.1").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
    );
    (stream, rest)
}

/// Ends `u1`'s streams as the admin API does when it deactivates `u1` (the user stays
/// active in the database, so the next stream opens).
fn revoke_u1(d: &TestDaemon) {
    d.daemon()
        .state()
        .events
        .access_changed(AccessChange::User {
            id: "u1",
            active: false,
        });
}

/// Opens `u1`'s stream and reads its first event (number 0): the stream is open and
/// armed.
async fn open_and_read_one(d: &TestDaemon) -> (TcpStream, Chunked) {
    let (mut stream, rest) = open(d).await;
    let mut chunked = Chunked::new(rest);
    publish(d, "u1", 0, 10);
    chunked
        .read_until(&mut stream, |c| !c.numbers().is_empty())
        .await;
    (stream, chunked)
}

/// Publishes notifications 1, 2, ... for `u1` from a thread of its own until told to
/// stop (or `most` were published).
fn publishing(d: &TestDaemon, most: usize) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = std::thread::spawn({
        let events = d.daemon().state().events.clone();
        let stop = stop.clone();
        move || {
            let mut n = 1;
            while !stop.load(Ordering::Relaxed) && n < most {
                events.notify("u1".into(), note("u1", n, 10));
                n += 1;
            }
        }
    });
    (stop, publisher)
}

/// A strict reader of a chunked body: `size-in-hex CRLF bytes CRLF`, ending with a
/// zero-size chunk.
struct Chunked {
    buf: Vec<u8>,
    body: Vec<u8>,
    finished: bool,
}

impl Chunked {
    fn new(rest: Vec<u8>) -> Self {
        Self {
            buf: rest,
            body: Vec::new(),
            finished: false,
        }
    }

    /// Parses the whole chunks in the buffer; panics on anything malformed.
    fn parse(&mut self) {
        while !self.finished {
            let Some(line_end) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                assert!(self.buf.len() < 16, "a chunk size line too long");
                return;
            };
            let size = std::str::from_utf8(&self.buf[..line_end]).unwrap();
            let size = usize::from_str_radix(size, 16)
                .unwrap_or_else(|_| panic!("not a chunk size: {size:?}"));
            let start = line_end + 2;
            if self.buf.len() < start + size + 2 {
                return;
            }
            assert_eq!(
                &self.buf[start + size..start + size + 2],
                b"\r\n",
                "a chunk not followed by CRLF"
            );
            self.body.extend_from_slice(&self.buf[start..start + size]);
            self.buf.drain(..start + size + 2);
            if size == 0 {
                self.finished = true;
                assert!(self.buf.is_empty(), "bytes after the last chunk");
            }
        }
    }

    /// The SSE events of the body so far: (event name, data).
    fn events(&self) -> Vec<(String, String)> {
        let text = std::str::from_utf8(&self.body).unwrap();
        text.split("\n\n")
            .filter(|block| !block.is_empty() && !block.starts_with(':'))
            .map(|block| {
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = n.to_owned();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = d.to_owned();
                    }
                }
                (name, data)
            })
            .collect()
    }

    /// The notification numbers received, in order.
    fn numbers(&self) -> Vec<usize> {
        self.events()
            .iter()
            .filter(|(name, _)| name == "notification")
            .map(|(_, data)| {
                let value: serde_json::Value = serde_json::from_str(data).unwrap();
                value["id"].as_str().unwrap()[1..].parse().unwrap()
            })
            .collect()
    }

    /// Reads from `stream` until `done` says so (or the body ends).
    async fn read_until(&mut self, stream: &mut TcpStream, done: impl Fn(&Self) -> bool) {
        let mut buf = vec![0u8; 64 * 1024];
        self.parse();
        while !done(self) && !self.finished {
            let n = tokio::time::timeout(BOUND, stream.read(&mut buf))
                .await
                .expect("more of the stream in time")
                .unwrap();
            if n == 0 {
                break;
            }
            self.buf.extend_from_slice(&buf[..n]);
            self.parse();
        }
    }
}

/// Publishes notifications `0..count` to `u1` one at a time, each once the one
/// before was read, and asserts that they all arrived in order.
async fn publish_and_read_each(
    d: &TestDaemon,
    stream: &mut TcpStream,
    chunked: &mut Chunked,
    count: usize,
) {
    for n in 0..count {
        publish(d, "u1", n, 10);
        chunked.read_until(stream, |c| c.numbers().len() > n).await;
    }
    assert_eq!(chunked.numbers(), (0..count).collect::<Vec<_>>());
}

/// Asserts that `chunked` holds notifications `0..k` for some k, in order, then one
/// `end` event with `reason`, and that the body then ended.
fn assert_prefix_then_end(chunked: &Chunked, reason: &str) -> usize {
    let numbers = chunked.numbers();
    let k = numbers.len();
    assert_eq!(numbers, (0..k).collect::<Vec<_>>(), "in order, none twice");
    let events = chunked.events();
    let last = events.last().expect("an end event");
    assert_eq!(last.0, "end", "the end event is last");
    assert_eq!(last.1, format!("{{\"reason\":\"{reason}\"}}"));
    assert_eq!(
        events.iter().filter(|(name, _)| name == "end").count(),
        1,
        "one end event"
    );
    assert!(chunked.finished, "the body ended after the end event");
    k
}

#[tokio::test]
async fn a_quiet_stream_gets_each_event_from_its_publisher_in_whole_chunks() {
    let d = daemon("coalesce = \"0s\"").await;
    let (mut stream, rest) = open(&d).await;
    let mut chunked = Chunked::new(rest);
    let before = written_directly(&d);
    publish_and_read_each(&d, &mut stream, &mut chunked, 50).await;
    let direct = written_directly(&d) - before;
    // Each event is published once the last one was read: the stream is quiet
    // unless its task and hyper are still finishing their last write.
    assert!(direct >= 1, "no event was written directly");
    eprintln!("{direct} of 50 events written directly");
    // The stream goes on after direct writes: its task still writes keep-alives and
    // its end.
    revoke_u1(&d);
    chunked.read_until(&mut stream, |_| false).await;
    assert_prefix_then_end(&chunked, "access_revoked");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_reader_that_stops_reading_gets_every_byte_in_order_then_its_end() {
    let d = daemon("buffer = 8\ncoalesce = \"0s\"").await;
    // A small receive window, so that the daemon's socket fills soon.
    let mut stream = d.connect_with_small_window().await;
    let (head, rest) = open_on(&mut stream, "HTTP/1.1").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let before = written_directly(&d);
    let published = publish_until_ended_slow(&d).await;
    let direct = written_directly(&d) - before;
    assert!(direct >= 1, "no event was written directly");
    // Now read it all: whole chunks, the events a prefix in order, then the end.
    let mut chunked = Chunked::new(rest);
    chunked.read_until(&mut stream, |_| false).await;
    let k = assert_prefix_then_end(&chunked, "slow_consumer");
    assert!(
        k as u64 >= direct,
        "{k} received, {direct} written directly"
    );
    eprintln!("{published} published, {direct} written directly, {k} received");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_reader_that_never_reads_again_is_disconnected_after_the_send_timeout() {
    let d = daemon_with("send_timeout = \"300ms\"", "buffer = 8\ncoalesce = \"0s\"").await;
    let mut stream = d.connect_with_small_window().await;
    let (head, rest) = open_on(&mut stream, "HTTP/1.1").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(d.daemon().state().events.open_streams(), 1);
    // The stream is ended as a slow consumer; its `end` cannot be written either while
    // the reader does not read.
    publish_until_ended_slow(&d).await;
    // Without the send timeout the connection (one of `server.max_connections`) would
    // stay until the reader reads again.
    let deadline = tokio::time::Instant::now() + BOUND;
    while closed_for_not_reading(&d) == 0 || d.daemon().state().events.open_streams() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still open after {BOUND:?}: {} closed for not reading, {} streams open",
            closed_for_not_reading(&d),
            d.daemon().state().events.open_streams()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(closed_for_not_reading(&d), 1);
    // What the socket held arrives, in order and in whole chunks, then the connection
    // ends without the body's last chunk: the client learns it was cut off.
    let mut chunked = Chunked::new(rest);
    chunked.read_until(&mut stream, |_| false).await;
    let numbers = chunked.numbers();
    assert_eq!(numbers, (0..numbers.len()).collect::<Vec<_>>());
    assert!(!chunked.finished, "a body cut off is not finished");
    // The cap is free again: the same user opens a new stream.
    let (mut again, rest) = open(&d).await;
    let mut chunked = Chunked::new(rest);
    publish(&d, "u1", 0, 10);
    chunked
        .read_until(&mut again, |c| !c.numbers().is_empty())
        .await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn an_end_racing_the_publisher_leaves_nothing_after_the_end_event() {
    let d = daemon("coalesce = \"0s\"").await;
    for round in 0..20 {
        let (mut stream, mut chunked) = open_and_read_one(&d).await;
        let (stop, publisher) = publishing(&d, 100_000);
        // End it while the publisher runs (after a round-dependent number of events).
        chunked
            .read_until(&mut stream, |c| c.numbers().len() > round * 5)
            .await;
        revoke_u1(&d);
        chunked.read_until(&mut stream, |_| false).await;
        stop.store(true, Ordering::Relaxed);
        publisher.join().unwrap();
        assert_prefix_then_end(&chunked, "access_revoked");
    }
    d.stop().await.unwrap();
}

#[tokio::test]
async fn with_direct_writes_off_every_event_takes_the_streams_task() {
    let d = daemon("coalesce = \"0s\"\ndirect_writes = false").await;
    let (mut stream, rest) = open(&d).await;
    let mut chunked = Chunked::new(rest);
    publish_and_read_each(&d, &mut stream, &mut chunked, 10).await;
    assert_eq!(written_directly(&d), 0);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn an_http10_stream_is_not_chunked_and_never_written_directly() {
    let d = daemon("coalesce = \"0s\"").await;
    let mut stream = TcpStream::connect(d.daemon().local_addr()).await.unwrap();
    let (head, mut body) = open_on(&mut stream, "HTTP/1.0").await;
    assert!(head.contains(" 200 "), "{head}");
    assert!(!head.to_ascii_lowercase().contains("chunked"), "{head}");
    let before = written_directly(&d);
    let mut buf = [0u8; 4096];
    for n in 0..5 {
        publish(&d, "u1", n, 10);
        let want = format!("\"id\":\"n{n}\"");
        while !String::from_utf8_lossy(&body).contains(&want) {
            let got = tokio::time::timeout(BOUND, stream.read(&mut buf))
                .await
                .expect("the event in time")
                .unwrap();
            assert!(got > 0, "closed");
            body.extend_from_slice(&buf[..got]);
        }
    }
    assert_eq!(written_directly(&d), before);
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.starts_with("event: notification\n") || text.starts_with(':'),
        "{text}"
    );
    assert!(
        !text.contains("\r\n"),
        "no chunk framing in an HTTP/1.0 body"
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_daemon_stopping_mid_stream_ends_it_with_whole_chunks() {
    let d = daemon("coalesce = \"0s\"").await;
    let (mut stream, mut chunked) = open_and_read_one(&d).await;
    let (stop, publisher) = publishing(&d, 1_000_000);
    let reader = tokio::spawn(async move {
        chunked.read_until(&mut stream, |_| false).await;
        chunked
    });
    d.stop().await.unwrap();
    let chunked = tokio::time::timeout(BOUND, reader)
        .await
        .expect("the stream ended in time")
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    publisher.join().unwrap();
    let numbers = chunked.numbers();
    assert_eq!(numbers, (0..numbers.len()).collect::<Vec<_>>());
    assert!(chunked.finished, "the body ended with its last chunk");
}
