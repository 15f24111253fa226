//! `caremsgd plugin inspect <file>`: prints a plugin's metadata and whether this
//! daemon can load it, and exits non-zero when it cannot.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is a failed test.

use std::process::Command;

use caremsg_testplugins::{PANIC_ABORT, SMS_LOOPBACK, WRONG_ABI, library_path};

const BIN: &str = env!("CARGO_BIN_EXE_caremsgd");

/// Runs `plugin inspect` on `file`: (exit code, stdout).
fn inspect(file: &std::path::Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["plugin", "inspect"])
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_loadable_plugin_is_described_and_accepted() {
    let path = library_path(SMS_LOOPBACK).unwrap();
    let (code, out) = inspect(&path);
    assert_eq!(code, 0, "{out}");
    for expected in [
        "name:     sms-loopback",
        "kind:     sms",
        "abi:      1.1",
        "unwind:   yes",
        "loadable: yes",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }
    assert!(out.contains(&path.display().to_string()), "{out}");
}

#[test]
fn incompatible_plugins_are_refused_with_the_reason() {
    let cases = [(WRONG_ABI, "ABI"), (PANIC_ABORT, "panic=abort")];
    for (package, reason) in cases {
        let path = library_path(package).unwrap();
        let (code, out) = inspect(&path);
        assert_eq!(code, 1, "{package}: {out}");
        assert!(out.contains("loadable: no"), "{package}: {out}");
        assert!(out.contains(reason), "{package}: {out}");
        assert!(
            out.contains(&path.display().to_string()),
            "{package}: {out}"
        );
    }
}

#[test]
fn a_file_that_is_no_library_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_library = dir.path().join("notes.so");
    std::fs::write(&not_a_library, "not a shared library").unwrap();
    let missing = dir.path().join("missing.so");
    for path in [not_a_library, missing] {
        let (code, out) = inspect(&path);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("loadable: no"), "{out}");
        assert!(out.contains(&path.display().to_string()), "{out}");
    }
}
