//! The `caremsgd` binary as systemd and an operator run it: `check-config`, `migrate`,
//! and `run` with `NOTIFY_SOCKET` (READY, the reload sequence on SIGHUP, STOPPING on
//! SIGTERM, exit status 0).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_caremsgd");

fn config_with(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let text = caremsg_config::EMBEDDED_DEFAULT
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = {:?}", dir.display().to_string()),
        )
        .replace("listen = \"127.0.0.1:8680\"", "listen = \"127.0.0.1:0\"")
        // Tests run in daemon/, where the default's relative library path does not
        // resolve: use the loopback library Cargo built for them.
        .replace(
            "\"target/debug/deps/libcaremsg_sms_loopback.so\"",
            &format!("{:?}", loopback_library().display().to_string()),
        );
    let path = dir.join("caremsg.toml");
    std::fs::write(&path, format!("{text}\n{extra}")).unwrap();
    path
}

fn loopback_library() -> std::path::PathBuf {
    caremsg_testplugins::library_path(caremsg_testplugins::SMS_LOOPBACK).unwrap()
}

#[test]
fn check_config_accepts_good_files_and_names_what_is_wrong() {
    let out = Command::new(BIN)
        .args(["check-config", "../config/caremsg.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new(BIN)
        .args(["check-config", "../config/caremsg.production.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten = \"nowhere\"\n").unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("listen"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    std::fs::write(&bad, "[sms_auth]\nmax_attempts = 0\n").unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("sms_auth.max_attempts"));
}

#[test]
fn migrate_creates_the_schema_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), "");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("migrate")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("caremsg.db").exists());
}

/// Reads notifications until one contains `wanted`; returns everything read.
fn read_until(socket: &UnixDatagram, wanted: &str) -> String {
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains(wanted) {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {wanted:?} from the daemon ({e}); got {seen:?}"));
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    seen
}

#[test]
fn run_tells_systemd_about_start_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), "");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let logs = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });

    let started = read_until(&socket, "READY=1");
    assert!(started.contains("STATUS=Serving"), "{started}");
    // One line on stdout says where it listens (the port the OS gave it).
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let port = first
        .trim()
        .strip_prefix("caremsgd: listening on http://127.0.0.1:")
        .unwrap_or_else(|| panic!("not the listening line: {first:?}"));
    assert!(port.parse::<u16>().is_ok_and(|p| p > 0), "{first:?}");

    // A valid reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 and a STATUS line.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("level = \"info\"", "level = \"debug\""),
    )
    .unwrap();
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let reload = read_until(&socket, "READY=1");
    assert!(reload.contains("RELOADING=1"), "{reload}");
    assert!(reload.contains("MONOTONIC_USEC="), "{reload}");
    assert!(
        reload.contains("STATUS=Serving; configuration reloaded"),
        "{reload}"
    );

    // A non-reloadable change is refused and the daemon keeps serving.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("127.0.0.1:0", "127.0.0.1:1"),
    )
    .unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let refused = read_until(&socket, "READY=1");
    assert!(refused.contains("reload refused"), "{refused}");

    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let stopping = read_until(&socket, "STOPPING=1");
    assert!(stopping.contains("STOPPING=1"));
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let logs = logs.join().unwrap().join("\n");
    assert!(
        logs.contains("server.listen"),
        "the refusal names the field: {logs}"
    );
    assert!(logs.contains("caremsgd has stopped"), "{logs}");
}

#[test]
fn check_config_warns_about_a_loopback_gateway_behind_a_public_url() {
    let dir = tempfile::tempdir().unwrap();
    let local = config_with(dir.path(), "");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&local)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && !text.contains("warning"), "{text}");

    let public = dir.path().join("public.toml");
    let config = std::fs::read_to_string(&local).unwrap();
    assert!(
        config.contains("public_url = \"http://127.0.0.1:8680\""),
        "{config}"
    );
    std::fs::write(
        &public,
        config.replace(
            "public_url = \"http://127.0.0.1:8680\"",
            "public_url = \"https://caremsg.clinic.example\"",
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&public)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "a warning is not an error: {text}");
    assert!(
        text.contains("warning: gateways[0].library: the loopback SMS gateway is for development"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("OK"), "{text}");
}

/// `caremsgd bench clinic` at toy sizes: it seeds through the API, runs every phase
/// (the big-team list too), fails no request and finds every acknowledged write stored.
/// (Its figures mean nothing at this size; they are the benchmark's, not a test's.)
#[test]
fn the_clinic_benchmark_runs_every_phase_and_loses_nothing() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "clinic",
            "--patients",
            "6",
            "--users",
            "3",
            "--team",
            "2",
            "--streams",
            "2",
            "--big-team",
            "5",
            "--clients",
            "2",
            "--seconds",
            "1",
        ])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for phase in [
        "clinic mix, no event streams",
        "clinic mix with event streams",
        "portal sends only",
        "staff list only:",
        "staff list only, one user on the big team's care teams",
        "staff opens a conversation only",
        "staff sends only",
        "inbound texts only",
    ] {
        assert!(report.contains(phase), "no phase {phase:?} in\n{report}");
    }
    // The binary installs its SQLite settings before anything else (`main`), and the
    // page-cache wrapper skipped the truncations of commits that split pages.
    let sqlite = report
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("SQLite runs with mimalloc and the page-cache wrapper (")
        })
        .unwrap_or_else(|| panic!("no line of the SQLite settings in\n{report}"));
    let skipped: u64 = sqlite
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {sqlite:?}"));
    assert!(skipped > 0, "{sqlite}");
    let phases = report.matches("failed requests").count();
    assert_eq!(phases, 8, "{report}");
    assert_eq!(
        report.matches("(target 0: met)").count(),
        phases,
        "{report}"
    );
    assert_eq!(
        report
            .matches("every acknowledged write stored: met")
            .count(),
        phases,
        "{report}"
    );
}
