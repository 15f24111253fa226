//! The systemd watchdog, end to end: the `caremsgd` binary started as systemd starts
//! it, with `NOTIFY_SOCKET` (a Unix datagram socket this test owns) and
//! `WATCHDOG_USEC`. It must say `READY=1`, ping `WATCHDOG=1` with a status line, go
//! through the reload sequence on SIGHUP while pinging, stop pinging while its writer
//! cannot commit, resume once it can, and say `STOPPING=1` on SIGTERM.
//!
//! The writer is made to hang the way it hangs in production, with no test hook in
//! the daemon: this test takes SQLite's write lock on the daemon's database
//! (`BEGIN IMMEDIATE` on its own connection) and sends one admin write. That write's
//! batch waits for the lock (the busy timeout is raised to minutes), the watchdog's
//! heartbeat queues behind it, and the pings stop until the test lets go of the lock.
//! The process environment of this test binary is never changed; the daemon is a
//! child process with its own.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, Executor};

const BIN: &str = env!("CARGO_BIN_EXE_caremsgd");

/// The watchdog interval given to the daemon; it pings at half of it.
const WATCHDOG: Duration = Duration::from_millis(600);

/// The notifications the daemon sends, read from the socket systemd would own.
struct Notifications {
    socket: UnixDatagram,
}

impl Notifications {
    fn bind(path: &Path) -> Self {
        Self {
            socket: UnixDatagram::bind(path).unwrap(),
        }
    }

    /// One datagram, or `None` once `deadline` has passed.
    fn next_before(&self, deadline: Instant) -> Option<String> {
        let left = deadline.checked_duration_since(Instant::now())?;
        self.socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("reading notifications: {e}"),
        }
    }

    /// Reads until a datagram contains `wanted` (30 s at most); returns it.
    fn until(&self, wanted: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while let Some(message) = self.next_before(deadline) {
            if message.contains(wanted) {
                return message;
            }
            seen.push(message);
        }
        panic!("no {wanted:?} from the daemon within 30 s; got {seen:#?}");
    }

    /// Everything received during `period`.
    fn during(&self, period: Duration) -> Vec<String> {
        let deadline = Instant::now() + period;
        std::iter::from_fn(|| self.next_before(deadline)).collect()
    }
}

/// The daemon as a child process, killed if the test fails half-way.
struct Daemon {
    child: Child,
    logs: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Daemon {
    fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args([name, &pid]).status().unwrap();
        assert!(status.success(), "kill {name} {pid}");
    }

    /// Waits for a clean exit and returns what the daemon logged.
    fn wait(mut self) -> String {
        let status = self.child.wait().unwrap();
        let logs = self.logs.take().unwrap().join().unwrap().join("\n");
        assert!(status.success(), "exit status {status:?}; logs:\n{logs}");
        logs
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.logs.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start(dir: &Path, notify_socket: &Path) -> Daemon {
    let config = caremsg_config::EMBEDDED_DEFAULT
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = {:?}", dir.display().to_string()),
        )
        .replace("listen = \"127.0.0.1:8680\"", "listen = \"127.0.0.1:0\"")
        // Tests run in daemon/, where the default's relative library path does not
        // resolve: use the loopback library Cargo built for them.
        .replace(
            "\"target/debug/deps/libcaremsg_sms_loopback.so\"",
            &format!(
                "{:?}",
                caremsg_testplugins::library_path(caremsg_testplugins::SMS_LOOPBACK)
                    .unwrap()
                    .display()
                    .to_string()
            ),
        );
    let path = dir.join("caremsg.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .env("NOTIFY_SOCKET", notify_socket)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
        .env_remove("WATCHDOG_PID")
        // The admin write below must wait for the test's lock, not give up.
        .env("CAREMSG__DATABASE__BUSY_TIMEOUT", "5min")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect()
    });
    Daemon {
        child,
        logs: Some(logs),
    }
}

/// Sends one HTTP/1.1 request; the response is read by [`response`].
fn request(port: u16, method: &str, path: &str, body: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer dev-admin-token\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream
}

fn response(mut stream: TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn pings_while_the_writer_commits_and_stops_while_it_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let notifications = Notifications::bind(&dir.path().join("notify.sock"));
    let daemon = start(dir.path(), &dir.path().join("notify.sock"));

    let ready = notifications.until("READY=1");
    assert!(ready.contains("STATUS=Serving"), "{ready}");

    // Pings, each with the status line an operator sees in `systemctl status`.
    let ping = notifications.until("WATCHDOG=1");
    let status = ping
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no status with the ping: {ping}"));
    assert!(status.starts_with("Serving on 127.0.0.1:"), "{status}");
    assert!(status.contains("(sqlite); 1 gateway; "), "{status}");
    assert!(status.contains(" conversation actors live; "), "{status}");
    assert!(
        status.ends_with(" writes since start, 0 queued"),
        "{status}"
    );
    let port: u16 = status["Serving on 127.0.0.1:".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    notifications.until("WATCHDOG=1");

    // The reload sequence, and pings go on after it.
    daemon.signal("-HUP");
    let reloading = notifications.until("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let reloaded = notifications.until("READY=1");
    assert!(
        reloaded.contains("STATUS=Serving; configuration"),
        "{reloaded}"
    );
    notifications.until("WATCHDOG=1");

    // Hang the writer: hold SQLite's write lock, then send a write that needs it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = dir.path().join("caremsg.db");
    let mut lock = runtime.block_on(async {
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        conn.execute("BEGIN IMMEDIATE").await.unwrap();
        conn
    });
    let write = request(
        port,
        "PUT",
        "/v1/admin/practices/watchdog-clinic",
        r#"{"name": "Watchdog Clinic", "sms_enabled": false, "portal_enabled": true,
            "country": "US", "timezone": "America/New_York"}"#,
    );

    // The heartbeat queues behind that write: a stall is reported, and from then on
    // not one ping for several watchdog periods.
    let stalled = notifications.until("STATUS=Stalled");
    assert!(stalled.contains("the writer made no progress"), "{stalled}");
    let during_stall = notifications.during(WATCHDOG * 2);
    assert!(
        during_stall.iter().all(|m| !m.contains("WATCHDOG=1")),
        "pinged while the writer hung: {during_stall:#?}"
    );
    assert!(
        during_stall.iter().any(|m| m.contains("STATUS=Stalled")),
        "{during_stall:#?}"
    );

    // Let go of the lock: the write commits, and the pings resume.
    runtime.block_on(async {
        lock.execute("ROLLBACK").await.unwrap();
        lock.close().await.unwrap();
    });
    let resumed = notifications.until("WATCHDOG=1");
    assert!(resumed.contains("1 writes since start"), "{resumed}");
    let answer = response(write);
    assert!(answer.starts_with("HTTP/1.1 20"), "{answer}");

    // The stall is counted for Prometheus.
    let metrics = response(request(port, "GET", "/metrics", ""));
    let stalls: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("caremsg_watchdog_stalls_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stall counter in:\n{metrics}"));
    assert!(stalls >= 1, "{stalls}");
    assert!(
        metrics.contains("caremsg_writer_heartbeat_seconds_count"),
        "{metrics}"
    );

    daemon.signal("-TERM");
    notifications.until("STOPPING=1");
    let after_stop = notifications.during(WATCHDOG);
    assert!(
        after_stop.iter().all(|m| !m.contains("WATCHDOG=1")),
        "pinged after STOPPING=1: {after_stop:#?}"
    );
    let logs = daemon.wait();
    assert!(
        logs.contains("the watchdog ping is withheld"),
        "the stall is logged: {logs}"
    );
    assert!(logs.contains("watchdog pings resume"), "{logs}");
    assert!(!logs.contains("Watchdog Clinic"), "no request data in logs");
}

/// Fills the file system holding `dir` with a file of zeros until it is full.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    for chunk in [1 << 20, 4096, 512] {
        let zeros = vec![0u8; chunk];
        while file.write_all(&zeros).is_ok() {}
    }
    let _ = file.sync_all();
}

/// The status line and body of one HTTP answer.
fn status_of(answer: &str) -> &str {
    answer.lines().next().unwrap_or_default()
}

#[test]
fn a_full_disk_stops_the_pings_until_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // The state folder on a tmpfs of its own (root only; CI runs as root).
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&state)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: mounting a tmpfs was refused; this test needs root.");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&state);
    let socket = dir.path().join("notify.sock");
    let notifications = Notifications::bind(&socket);
    let daemon = start(&state, &socket);
    notifications.until("READY=1");
    let ping = notifications.until("WATCHDOG=1");
    let port: u16 = ping
        .split("Serving on 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {ping}"));

    // The disk fills up: a write is refused with 503, /readyz says why.
    let filler = state.join("filler");
    fill(&filler);
    let body = r#"{"name": "Full Clinic", "sms_enabled": false, "portal_enabled": true,
            "country": "US", "timezone": "America/New_York"}"#;
    let refused = response(request(
        port,
        "PUT",
        "/v1/admin/practices/full-clinic",
        body,
    ));
    assert!(status_of(&refused).starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("storage_unavailable"), "{refused}");
    let ready = response(request(port, "GET", "/readyz", ""));
    assert!(status_of(&ready).starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains(r#""status":"unavailable""#), "{ready}");

    // No ping while the writer cannot commit.
    let stalled = notifications.until("STATUS=Stalled");
    assert!(stalled.contains("the writer made no progress"), "{stalled}");
    let during = notifications.during(WATCHDOG * 2);
    assert!(
        during.iter().all(|m| !m.contains("WATCHDOG=1")),
        "pinged while the disk was full: {during:#?}"
    );

    // Space returns: the probe write commits, pings resume, writes are taken.
    std::fs::remove_file(&filler).unwrap();
    notifications.until("WATCHDOG=1");
    let ready = response(request(port, "GET", "/readyz", ""));
    assert!(status_of(&ready).starts_with("HTTP/1.1 200"), "{ready}");
    let taken = response(request(
        port,
        "PUT",
        "/v1/admin/practices/full-clinic",
        body,
    ));
    assert!(status_of(&taken).starts_with("HTTP/1.1 200"), "{taken}");

    daemon.signal("-TERM");
    notifications.until("STOPPING=1");
    let logs = daemon.wait();
    assert!(logs.contains("The writer cannot commit"), "{logs}");
    assert!(logs.contains("The writer commits again"), "{logs}");
    assert!(!logs.contains("Full Clinic"), "no request data in logs");
}
