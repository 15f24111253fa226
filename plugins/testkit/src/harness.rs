//! A host for a plugin's own integration tests: loads the plugin library through the
//! real host (`caremsg-plugin-host`), gives it the real HTTP service allowed to reach
//! a loopback [`Fake`] server (which keeps what it received), and records the plugin's
//! log lines. The battery ([`crate::run`]) checks conformance; this is for checking a
//! plugin's own wire format and mapping.
//!
//! ```no_run
//! # fn main() -> Result<(), String> {
//! use caremsg_plugin_testkit::harness::Harness;
//! let harness = Harness::start("target/debug/libmy_plugin.so".as_ref(), |fake_url| {
//!     format!(r#"{{"url": "{fake_url}/messages"}}"#)
//! })?;
//! let received = harness.fake().received();
//! # Ok(()) }
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use caremsg_plugin_host::{HyperHttp, Instance, Level, load};

use crate::INSTANCE;
use crate::fake::Fake;
use crate::recorder::Recorder;

/// A started plugin instance with its loopback fake; stops the instance when dropped.
pub struct Harness {
    /// The instance under test.
    instance: Instance,
    /// Its host services: the real HTTP client and the log recorder.
    recorder: Arc<Recorder>,
    /// The loopback HTTP server the instance may reach.
    fake: Fake,
    /// Drives the HTTP client and the fake; dropped last.
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("instance", &self.instance.name())
            .field("fake", &self.fake.addr)
            .finish_non_exhaustive()
    }
}

impl Harness {
    /// Loads `library`, starts the fake server and starts an instance (named
    /// [`INSTANCE`]) with the configuration `config` builds from the fake's base URL
    /// (`http://127.0.0.1:PORT`). The error is the load failure or the plugin's
    /// refusal message.
    pub fn start(library: &Path, config: impl FnOnce(&str) -> String) -> Result<Harness, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        let fake = Fake::start(runtime.handle())
            .map_err(|e| format!("cannot start the fake server: {e}"))?;
        let http = HyperHttp::new(runtime.handle().clone(), Duration::from_secs(10));
        http.set_allowed_hosts(INSTANCE, [fake.addr.to_string()]);
        let recorder = Arc::new(Recorder::new(http));
        let plugin = load(library).map_err(|e| e.to_string())?;
        let config = config(&fake.url());
        let instance = plugin
            .start(INSTANCE, &config, recorder.clone())
            .map_err(|e| e.to_string())?;
        Ok(Harness {
            instance,
            recorder,
            fake,
            runtime,
        })
    }

    /// The running instance.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// The loopback fake server (script its answers, read what it received).
    pub fn fake(&self) -> &Fake {
        &self.fake
    }

    /// The runtime driving the fake and the HTTP client, for a test's own servers.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        self.runtime.handle()
    }

    /// Every line the plugin logged so far.
    pub fn logs(&self) -> Vec<(Level, String)> {
        self.recorder.logs()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // A test that already stopped the instance gets an error here; nothing to do.
        let _ = self.instance.stop();
    }
}
