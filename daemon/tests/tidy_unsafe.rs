//! Tidy check over every Rust file of the workspace (not only `plugins/`): `unsafe` is
//! allowed only in the plugin host's loader, the SDK's export shims (and those of the
//! frozen SDK 1.0 copy the ABI tests build), and the
//! documented SQLite exceptions: `daemon/src/db.rs` (the query-planner stability
//! switch, which sqlx does not expose) and `daemon/src/sqlite_tuning.rs` (the
//! process-wide allocator and page cache settings), with the three callers of its
//! `unsafe fn install` (`daemon/src/main.rs`, `daemon/tests/sqlite_tuning.rs`,
//! `daemon/tests/sqlite_tuning_refused.rs`).

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

#[test]
fn unsafe_code_is_allowed_only_where_architecture_md_says() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace folder");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 50, "found only {} files", files.len());
    let mut allowed: Vec<String> = files
        .iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .expect("readable")
                .contains(concat!("allow(", "unsafe_code)"))
        })
        .filter_map(|f| f.strip_prefix(&root).ok().map(|p| p.display().to_string()))
        .collect();
    allowed.sort();
    assert_eq!(
        allowed,
        [
            "daemon/src/db.rs",
            "daemon/src/main.rs",
            "daemon/src/sqlite_tuning.rs",
            "daemon/tests/sqlite_tuning.rs",
            "daemon/tests/sqlite_tuning_refused.rs",
            "plugins/host/src/ffi.rs",
            "plugins/sdk/src/ffi.rs",
            "plugins/sdk/src/lib.rs",
            "plugins/testkit/tests/tidy.rs",
            // A frozen copy of the SDK 1.0 (ABI compatibility tests).
            "plugins/testplugins/sdk-v1_0/src/ffi.rs",
            "plugins/testplugins/sdk-v1_0/src/lib.rs",
        ]
    );
}
