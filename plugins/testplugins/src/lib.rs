//! Deliberately broken test plugins (as dependencies, so Cargo builds them), and
//! [`library_path`], which finds any plugin library Cargo built for the running test.
//!
//! - `caremsg-testplugin-broken-panics`: panics in `send` and in `handle_webhook`.
//! - `caremsg-testplugin-wrong-abi`: declares ABI major 2 (through the SDK's hidden
//!   `__export_plugin_with!`), under the v1 entry symbol.
//! - `caremsg-testplugin-panic-abort`: declares that it was built with
//!   `panic = "abort"`. Cargo cannot set `panic` per package, so it is really built
//!   with unwinding and its declaration clears the unwind flag by hand; the host
//!   judges by the flag, so this exercises exactly the refusal path.
//! - `caremsg-testplugin-http-status`: a working plugin that sends through the
//!   host's `http` service and maps HTTP statuses to send results (for the
//!   testkit's send-mapping checks against its loopback fake).
//! - `caremsg-testplugin-abi-v1-0`: a working SMS plugin built against
//!   `sdk-v1_0`, a frozen copy of the SDK at ABI 1.0: today's host must load it.
//!
//! A crate's cdylib is built next to the test executables (`target/<profile>/deps`)
//! when a test crate depends on it, and uplifted to `target/<profile>` by a plain
//! `cargo build`; [`library_path`] looks in both.

use std::path::PathBuf;

/// The package name of the plugin that panics in `send` and `handle_webhook`.
pub const BROKEN_PANICS: &str = "caremsg-testplugin-broken-panics";
/// The package name of the plugin that declares ABI major 2.
pub const WRONG_ABI: &str = "caremsg-testplugin-wrong-abi";
/// The package name of the plugin that declares a `panic = "abort"` build.
pub const PANIC_ABORT: &str = "caremsg-testplugin-panic-abort";
/// The package name of the plugin that sends through the host's HTTP service.
pub const HTTP_STATUS: &str = "caremsg-testplugin-http-status";
/// The package name of the SMS plugin built against the SDK frozen at ABI 1.0.
pub const ABI_V1_0: &str = "caremsg-testplugin-abi-v1-0";
/// The package name of the development SMS gateway.
pub const SMS_LOOPBACK: &str = "caremsg-sms-loopback";

/// The file name of a package's cdylib on this platform (`libcaremsg_sms_loopback.so`).
pub fn library_file_name(package: &str) -> String {
    format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        package.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    )
}

/// Finds the cdylib of `package` built for the running executable: next to it
/// (`target/debug/deps`) or one folder up (`target/debug`).
pub fn library_path(package: &str) -> Result<PathBuf, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the running executable: {e}"))?;
    let name = library_file_name(package);
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(&name))
        .collect();
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        format!(
            "{name} was not built: looked at {:?}; add {package} to the test crate's dev-dependencies",
            candidates
        )
    })
}
