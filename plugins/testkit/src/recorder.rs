//! The battery's [`HostServices`]: records what the plugin asks of the host, can
//! pretend to be saturated, and notices calls after stop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use caremsg_plugin_host::{
    EmitOutcome, Event, HostServices, HttpRequest, HttpResponse, HyperHttp, Level,
};

/// Where the battery says its hooks are (`Host::hook_url` is this plus the
/// instance name): the default `public_url` of webhook cases.
pub const HOOK_BASE: &str = "http://127.0.0.1:8080/v1/hooks";

/// Records service calls.
pub(crate) struct Recorder {
    /// The real HTTP client, pointed at the fake by the allow-list.
    http: HyperHttp,
    /// When set, `emit` answers busy.
    pub(crate) busy: AtomicBool,
    /// Set right after `stop` returned.
    pub(crate) stopped: AtomicBool,
    /// Service calls seen after `stopped` was set.
    pub(crate) after_stop: AtomicU64,
    /// Events taken by `emit`.
    pub(crate) emitted: AtomicU64,
    /// `emit` calls answered busy.
    pub(crate) refused_busy: AtomicU64,
    /// Every log line.
    pub(crate) logs: Mutex<Vec<(Level, String)>>,
}

impl Recorder {
    pub(crate) fn new(http: HyperHttp) -> Self {
        Recorder {
            http,
            busy: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            after_stop: AtomicU64::new(0),
            emitted: AtomicU64::new(0),
            refused_busy: AtomicU64::new(0),
            logs: Mutex::new(Vec::new()),
        }
    }

    fn note_call(&self) {
        if self.stopped.load(Ordering::SeqCst) {
            self.after_stop.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A copy of the log lines.
    pub(crate) fn logs(&self) -> Vec<(Level, String)> {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl HostServices for Recorder {
    fn emit(&self, _instance: &str, _event: Event) -> EmitOutcome {
        self.note_call();
        if self.busy.load(Ordering::SeqCst) {
            self.refused_busy.fetch_add(1, Ordering::SeqCst);
            EmitOutcome::Busy
        } else {
            self.emitted.fetch_add(1, Ordering::SeqCst);
            EmitOutcome::Accepted
        }
    }

    fn log(&self, _instance: &str, level: Level, message: &str) {
        self.note_call();
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((level, message.to_owned()));
    }

    fn http(&self, instance: &str, request: HttpRequest) -> Result<HttpResponse, String> {
        self.note_call();
        self.http
            .request(instance, request)
            .map_err(|e| e.to_string())
    }

    fn hook_url(&self, instance: &str) -> Option<String> {
        self.note_call();
        Some(format!("{HOOK_BASE}/{instance}"))
    }
}
