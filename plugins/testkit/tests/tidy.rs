//! Tidy checks over every Rust file under `plugins/`: each starts with a `//!` line,
//! and `unsafe_code` is allowed only in the SDK's export shims and the host's loader.

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable folder") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, found);
            }
        } else if name.ends_with(".rs") {
            found.push(path);
        }
    }
}

fn plugin_sources() -> (PathBuf, Vec<PathBuf>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("plugins folder");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 10, "found only {files:?}");
    (root, files)
}

#[test]
fn every_module_starts_with_a_doc_line() {
    let (_, files) = plugin_sources();
    let missing: Vec<_> = files
        .iter()
        .filter(|f| {
            !std::fs::read_to_string(f)
                .expect("readable")
                .starts_with("//!")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a leading //! line: {missing:?}"
    );
}

#[test]
fn unsafe_code_is_allowed_only_in_the_two_ffi_modules() {
    let (root, files) = plugin_sources();
    let mut allowed: Vec<String> = files
        .iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .expect("readable")
                .contains("allow(unsafe_code)")
        })
        .filter_map(|f| f.strip_prefix(&root).ok().map(|p| p.display().to_string()))
        .filter(|p| !p.ends_with("tests/tidy.rs"))
        .collect();
    allowed.sort();
    // sdk/src/lib.rs: only the `#[unsafe(no_mangle)]` entry symbol in `export_plugin!`.
    assert_eq!(
        allowed,
        [
            "host/src/ffi.rs",
            "sdk/src/ffi.rs",
            "sdk/src/lib.rs",
            // The SDK frozen at ABI 1.0 (a copy, for the compatibility test plugin).
            "testplugins/sdk-v1_0/src/ffi.rs",
            "testplugins/sdk-v1_0/src/lib.rs",
        ]
    );
}

/// Lines of code of a plugin's `src/`: not blank, not a comment, and not in a
/// `#[cfg(test)]` module (they close each file here).
fn code_lines(plugin: &str) -> usize {
    let (root, files) = plugin_sources();
    let src = root.join(plugin).join("src");
    files
        .iter()
        .filter(|f| f.starts_with(&src))
        .map(|f| {
            std::fs::read_to_string(f)
                .expect("readable")
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("#[cfg(test)]"))
                .filter(|l| !l.is_empty() && !l.starts_with("//"))
                .count()
        })
        .sum()
}

#[test]
fn the_telnyx_plugin_stays_small_on_the_sdk_helpers() {
    // Issue 16: a provider written on the SDK's helpers takes at most 250 lines.
    let lines = code_lines("sms-telnyx");
    assert!(
        (100..=250).contains(&lines),
        "sms-telnyx has {lines} lines of code"
    );
}
