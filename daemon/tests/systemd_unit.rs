//! The systemd files as systemd reads them: `systemd-analyze verify` reports nothing
//! on the unit, `systemd-analyze security --offline=true` rates its exposure at 1.5 or
//! lower, and the sysusers and tmpfiles files create the user and directories the
//! unit names.
//!
//! `systemd-analyze` comes with the `systemd` package (`.ci/run` installs it when it
//! is missing). Verification checks that `ExecStart=`'s binary exists, so `verify`
//! runs on a temporary copy of the unit whose `ExecStart=` names the binary this
//! build produced instead of `/usr/bin/caremsgd`; everything else is verified as
//! shipped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The highest exposure `systemd-analyze security` may report (the target).
const MAX_EXPOSURE: f64 = 1.5;

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("systemd")
}

fn unit_path() -> PathBuf {
    systemd_dir().join("caremsgd.service")
}

fn unit_text() -> String {
    std::fs::read_to_string(unit_path()).unwrap()
}

/// Runs a systemd tool; a missing tool is a failure that says what to install.
fn systemd_tool(tool: &str, args: &[&str], file: &Path) -> Output {
    Command::new(tool)
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} ({e}); install the `systemd` package"))
}

/// The values of `Key=` in the unit, in order (systemd uses the last one for most).
fn directive<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn systemd_analyze_verify_reports_nothing() {
    let unit = unit_text();
    assert_eq!(
        directive(&unit, "ExecStart"),
        ["/usr/bin/caremsgd --config /etc/caremsg/caremsg.toml run"]
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("caremsgd.service");
    std::fs::write(
        &copy,
        unit.replace(
            "ExecStart=/usr/bin/caremsgd ",
            &format!("ExecStart={} ", env!("CARGO_BIN_EXE_caremsgd")),
        ),
    )
    .unwrap();
    let out = systemd_tool("systemd-analyze", &["verify"], &copy);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "systemd-analyze verify reported:\n{report}"
    );
}

#[test]
fn systemd_analyze_security_rates_the_unit_at_most_1_5() {
    let out = systemd_tool(
        "systemd-analyze",
        &["security", "--offline=true"],
        &unit_path(),
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for caremsgd.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no overall exposure in:\n{report}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let open: Vec<&str> = report.lines().filter(|l| l.starts_with('✗')).collect();
    println!("exposure {exposure}; open items:\n{}", open.join("\n"));
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}:\n{report}"
    );
}

#[test]
fn the_unit_keeps_the_promises_the_daemon_relies_on() {
    let unit = unit_text();
    for (key, value) in [
        ("Type", "notify"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("User", "caremsg"),
        ("Group", "caremsg"),
        ("StateDirectory", "caremsg"),
        ("ConfigurationDirectory", "caremsg"),
        ("ProtectSystem", "strict"),
        ("ReadOnlyPaths", "-/usr/lib/caremsg/plugins"),
        ("NoNewPrivileges", "yes"),
        // The daemon pings at half this interval (daemon/src/watchdog.rs).
        ("WatchdogSec", "30s"),
    ] {
        assert_eq!(directive(&unit, key).last(), Some(&value), "{key}=");
    }
    // The daemon's network: loopback HTTP, PostgreSQL over TCP or its socket,
    // sd_notify, and the gateways' providers. Without these it would start and fail.
    let families = directive(&unit, "RestrictAddressFamilies").join(" ");
    for family in ["AF_UNIX", "AF_INET", "AF_INET6"] {
        assert!(families.contains(family), "{families}");
    }
    assert!(directive(&unit, "PrivateNetwork").is_empty());
    assert!(directive(&unit, "IPAddressDeny").is_empty());
}

/// Files the daemon keeps open beside client connections: the database pool and the
/// writer's connection, SQLite's files, plugins' libraries and provider connections,
/// the journal, the runtime's own descriptors.
const OTHER_FILES: u64 = 512;

#[test]
fn the_open_file_limit_leaves_room_for_the_connection_cap() {
    let unit = unit_text();
    let limit: u64 = directive(&unit, "LimitNOFILE")
        .last()
        .expect("the unit sets LimitNOFILE=")
        .parse()
        .expect("LimitNOFILE= is one number (soft and hard alike)");
    let settings = caremsg_config::Settings::default();
    // The cap, plus the one connection the accept loop holds while it makes room.
    let connections = settings.server.max_connections as u64 + 1;
    // An event stream's connection holds a second descriptor, the duplicate its
    // direct writes go through (daemon/src/direct.rs).
    let streams = (settings.events.max_streams as u64).min(connections);
    let database = u64::from(settings.database.max_connections) + 1;
    assert!(
        connections + streams + database + OTHER_FILES <= limit,
        "LimitNOFILE={limit} is too small for server.max_connections={} \
         (+ {streams} streams' duplicates + {database} database connections + {OTHER_FILES} other files)",
        settings.server.max_connections
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

#[test]
fn sysusers_creates_the_unit_s_user_and_tmpfiles_its_directories() {
    if !is_root() {
        println!("note: sysusers/tmpfiles not applied: they chown, which needs root");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    for dir in ["etc/caremsg", "var/lib", "usr/lib"] {
        std::fs::create_dir_all(root.path().join(dir)).unwrap();
    }
    let root_arg = format!("--root={}", root.path().display());

    let out = systemd_tool(
        "systemd-sysusers",
        &[&root_arg],
        &systemd_dir().join("caremsgd.sysusers"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let user: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("caremsg:"))
        .unwrap_or_else(|| panic!("no caremsg user in:\n{passwd}"))
        .split(':')
        .collect();
    assert_eq!(user[5], "/var/lib/caremsg", "home");
    assert!(user[6].ends_with("nologin"), "shell: {}", user[6]);
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("caremsg:")), "{group}");

    // tmpfiles, in the same root, with the config file as the package installs it.
    let config = root.path().join("etc/caremsg/caremsg.toml");
    std::fs::write(&config, "").unwrap();
    let out = systemd_tool(
        "systemd-tmpfiles",
        &[&root_arg, "--create"],
        &systemd_dir().join("caremsgd.tmpfiles"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uid: u32 = user[2].parse().unwrap();
    let gid: u32 = user[3].parse().unwrap();
    let state = std::fs::metadata(root.path().join("var/lib/caremsg")).unwrap();
    assert_eq!(
        (state.uid(), state.gid(), state.mode() & 0o7777),
        (uid, gid, 0o750),
        "/var/lib/caremsg"
    );
    let config = std::fs::metadata(&config).unwrap();
    assert_eq!(
        (config.uid(), config.gid(), config.mode() & 0o7777),
        (0, gid, 0o640),
        "/etc/caremsg/caremsg.toml"
    );
}
