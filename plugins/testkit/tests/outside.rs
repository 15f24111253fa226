//! The plugin template (`plugins/template`) builds outside this workspace, the way a
//! plugin author's own crate would: copied to a temporary folder as a workspace of its
//! own, depending on the SDK by path, built offline with the pinned toolchain; the
//! result loads in the host. A cold build of its dependencies takes a minute on two
//! cores, so it runs when `CAREMSG_OUTSIDE_BUILD_TEST=1` (CI sets it).

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

use std::path::Path;
use std::process::Command;

#[test]
fn the_template_builds_outside_the_workspace_and_loads() {
    if std::env::var("CAREMSG_OUTSIDE_BUILD_TEST").as_deref() != Ok("1") {
        println!(
            "note: set CAREMSG_OUTSIDE_BUILD_TEST=1 to build the template outside the workspace"
        );
        return;
    }
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap();
    let root = plugins.join("..");
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("sms-template");
    std::fs::create_dir_all(crate_dir.join("src")).unwrap();
    let manifest = std::fs::read_to_string(plugins.join("template/Cargo.toml")).unwrap();
    let sdk = plugins.join("sdk");
    let manifest = manifest.replace(
        r#"path = "../sdk""#,
        &format!("path = {:?}", sdk.display().to_string()),
    );
    assert!(
        manifest.contains(&sdk.display().to_string()),
        "the SDK path was not rewritten"
    );
    std::fs::write(
        crate_dir.join("Cargo.toml"),
        format!("{manifest}\n[workspace]\n"),
    )
    .unwrap();
    std::fs::copy(
        plugins.join("template/src/lib.rs"),
        crate_dir.join("src/lib.rs"),
    )
    .unwrap();
    // The workspace's lock file: the same versions, all in the local registry cache.
    std::fs::copy(root.join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();
    std::fs::copy(
        root.join("rust-toolchain.toml"),
        crate_dir.join("rust-toolchain.toml"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO"))
        .current_dir(&crate_dir)
        .args(["build", "--offline", "--quiet"])
        .env("CARGO_TARGET_DIR", dir.path().join("target"))
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the template did not build outside the workspace:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let library = dir
        .path()
        .join("target/debug")
        .join(caremsg_testplugins::library_file_name(
            "caremsg-plugin-template",
        ));
    let metadata = caremsg_plugin_host::inspect(&library).unwrap();
    assert!(metadata.is_loadable(), "{metadata}");
    assert_eq!(metadata.name.as_deref(), Some("sms-template"));
}
