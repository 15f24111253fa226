//! Bounded connections (issue #14, item 10): a connection that trickles its request
//! head is closed after `server.header_read_timeout`, one with no request in progress
//! after `server.idle_timeout`, and past `server.max_connections` the longest-idle
//! connection makes room, so `/healthz` still answers; an event stream, a request in
//! progress, is cut by neither timeout. A client that stops reading its answers is
//! disconnected after `server.send_timeout`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::time::{Duration, Instant};

use caremsg_tests::{STAFF_TOKEN, TestDaemon};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any step here may take before the test fails.
const BOUND: Duration = Duration::from_secs(10);

async fn daemon(header_read: &str, idle: &str, max_connections: usize) -> TestDaemon {
    daemon_sending(header_read, idle, "30s", max_connections).await
}

async fn daemon_sending(
    header_read: &str,
    idle: &str,
    send: &str,
    max_connections: usize,
) -> TestDaemon {
    let settings = format!(
        "listen = \"127.0.0.1:0\"\nheader_read_timeout = \"{header_read}\"\nidle_timeout = \"{idle}\"\nsend_timeout = \"{send}\"\nmax_connections = {max_connections}\nsse_keepalive = \"100ms\""
    );
    TestDaemon::start_with(|text| text.replace("listen = \"127.0.0.1:0\"", &settings))
        .await
        .unwrap()
}

async fn connect(d: &TestDaemon) -> TcpStream {
    TcpStream::connect(d.daemon().local_addr()).await.unwrap()
}

/// Waits (at most [`BOUND`]) until the server closes `stream`, reading and dropping
/// whatever it sends first; returns how long that took.
async fn closed_within_bound(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(BOUND, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the connection was still open after {BOUND:?}"),
        }
    }
}

/// Sends `GET /healthz` on a kept-alive connection and reads the whole answer.
async fn healthz_on(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: caremsg\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"{\"status\":\"ok\"}") {
        let n = tokio::time::timeout(BOUND, stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test]
async fn silent_and_kept_alive_connections_are_closed_after_the_idle_timeout() {
    let d = daemon("30s", "300ms", 64).await;
    // A connection that never sends a byte.
    let mut silent = connect(&d).await;
    let took = closed_within_bound(&mut silent).await;
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );
    // A connection kept alive after a request.
    let mut kept = connect(&d).await;
    healthz_on(&mut kept).await;
    healthz_on(&mut kept).await;
    let took = closed_within_bound(&mut kept).await;
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_trickled_request_head_is_cut_off_after_the_header_read_timeout() {
    let d = daemon("400ms", "30s", 64).await;
    let mut slow = connect(&d).await;
    let head = b"GET /healthz HTTP/1.1\r\nHost: caremsg\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = Instant::now();
    let mut cut_off = false;
    for byte in head.iter() {
        // One byte every 50 ms: the head would take over 5 s.
        if slow.write_all(std::slice::from_ref(byte)).await.is_err() {
            cut_off = true;
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(50), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut_off = true;
                break;
            }
            Ok(Ok(_)) => panic!("answered a head that never completed"),
            Err(_) => {}
        }
    }
    let took = started.elapsed();
    assert!(cut_off, "the whole head was accepted over {took:?}");
    assert!(
        took >= Duration::from_millis(350),
        "cut off too early: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "cut off too late: {took:?}");
    // A prompt request on a new connection is served.
    let mut prompt = connect(&d).await;
    healthz_on(&mut prompt).await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn an_event_stream_outlives_both_timeouts() {
    let d = daemon("200ms", "200ms", 64).await;
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    let mut stream = d
        .http
        .get(format!("{}/v1/staff/events", d.base))
        .bearer_auth(STAFF_TOKEN)
        .header("X-Caremsg-User", "u1")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    // Keep-alive comments keep coming for 1 s: five idle timeouts.
    let started = Instant::now();
    let mut chunks = 0;
    while started.elapsed() < Duration::from_secs(1) {
        let chunk = tokio::time::timeout(BOUND, stream.chunk())
            .await
            .expect("a keep-alive in time")
            .expect("the stream is open");
        assert!(chunk.is_some(), "the stream ended");
        chunks += 1;
    }
    assert!(chunks >= 3, "{chunks} chunks");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn past_the_cap_idle_connections_make_room_and_busy_ones_make_new_ones_wait() {
    let d = daemon("60s", "60s", 3).await;
    // Three idle connections fill the cap (each has been served once, so each is
    // registered).
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut stream = connect(&d).await;
        healthz_on(&mut stream).await;
        idle.push(stream);
    }
    // A fourth client is served: the longest-idle connection made room.
    let mut fourth = connect(&d).await;
    healthz_on(&mut fourth).await;
    closed_within_bound(&mut idle[0]).await;
    // The others are still open and usable.
    healthz_on(&mut idle[1]).await;
    healthz_on(&mut idle[2]).await;
    drop(idle);
    drop(fourth);

    // Now fill the cap with event streams (requests in progress): a new connection
    // waits until one ends, then is served.
    d.practice("p1").await;
    d.user("p1", "u1", &[]).await;
    let open_stream = || async {
        let response = reqwest::Client::new()
            .get(format!("{}/v1/staff/events", d.base))
            .bearer_auth(STAFF_TOKEN)
            .header("X-Caremsg-User", "u1")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response
    };
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(open_stream().await);
    }
    let waiting = tokio::spawn({
        let url = format!("{}/healthz", d.base);
        async move {
            reqwest::Client::new()
                .get(url)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    // It is not served while the cap is full of streams...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "served past the cap");
    // ... and is once one ends.
    drop(streams.pop());
    let status = tokio::time::timeout(BOUND, waiting)
        .await
        .expect("served once a stream ended")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    drop(streams);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_disconnected_after_the_send_timeout() {
    let d = daemon_sending("60s", "60s", "300ms", 64).await;
    let closed = || d.connections_closed("send_timeout");
    // A small receive window, and requests pipelined without reading an answer: the
    // answers fill the daemon's socket and its writes stall.
    let (mut read, mut write) = d.connect_with_small_window().await.into_split();
    let writer = tokio::spawn(async move {
        let requests = b"GET /healthz HTTP/1.1\r\nHost: caremsg\r\n\r\n".repeat(100);
        let mut sent = 0;
        while sent < 2_000 && write.write_all(&requests).await.is_ok() {
            sent += 1;
        }
        sent * 100
    });
    let deadline = Instant::now() + BOUND;
    while closed() == 0 {
        assert!(
            Instant::now() < deadline,
            "not disconnected after {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The writer stops: its requests are refused once the connection is gone.
    let sent = tokio::time::timeout(BOUND, writer)
        .await
        .expect("the pipelining client stopped in time")
        .unwrap();
    // What the client then reads ends (a close or a reset) short of every answer.
    let mut answers = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail = Vec::new();
    loop {
        match tokio::time::timeout(BOUND, read.read(&mut buf))
            .await
            .expect("the connection ended in time")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                answers += tail.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
                let keep = tail.len().saturating_sub(11);
                tail.drain(..keep);
            }
        }
    }
    assert!(answers < sent, "{answers} answers of {sent} requests");
    assert_eq!(closed(), 1);
    // Other clients are served as before.
    let mut other = connect(&d).await;
    healthz_on(&mut other).await;
    d.stop().await.unwrap();
}
