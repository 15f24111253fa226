//! Loading plugins ([`load`], [`inspect`]) and calling their instances safely
//! ([`Plugin`], [`Instance`]). Safe code over [`crate::ffi`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use caremsg_plugin_sdk::abi::{self, StructSizes};

use crate::compat::{self, HOST_ABI};
use crate::error::{CallError, LoadError, StartError};
use crate::ffi::{self, CallCtx, HostCtx, RawInstance};
use crate::types::{
    Health, HostServices, Kind, Outbound, SendOutcome, WebhookOutcome, WebhookRequest,
};

/// How many events one webhook call may emit before `emit` answers busy, unless
/// changed with [`Instance::set_webhook_event_limit`].
pub const DEFAULT_WEBHOOK_EVENT_LIMIT: usize = 100;

/// What a plugin file declares, and whether this daemon can load it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// The file.
    pub path: PathBuf,
    /// The ABI major version it was built for.
    pub abi_major: u32,
    /// The ABI minor version it was built for.
    pub abi_minor: u32,
    /// Whether it was built with `panic = "unwind"`.
    pub built_with_unwind: bool,
    /// Its name (read only from declarations of this host's major version).
    pub name: Option<String>,
    /// Its version.
    pub version: Option<String>,
    /// The SDK version it was built with.
    pub sdk_version: Option<String>,
    /// Its kind.
    pub kind: Option<Kind>,
    /// `None` if this daemon can load it, else why not.
    pub problem: Option<String>,
}

impl Metadata {
    /// Whether this daemon can load the plugin.
    pub fn is_loadable(&self) -> bool {
        self.problem.is_none()
    }
}

impl fmt::Display for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unknown = "(unknown)";
        writeln!(f, "file:     {}", self.path.display())?;
        writeln!(f, "name:     {}", self.name.as_deref().unwrap_or(unknown))?;
        writeln!(
            f,
            "version:  {}",
            self.version.as_deref().unwrap_or(unknown)
        )?;
        writeln!(f, "kind:     {}", self.kind.map_or(unknown, Kind::as_str))?;
        writeln!(
            f,
            "sdk:      {}",
            self.sdk_version.as_deref().unwrap_or(unknown)
        )?;
        writeln!(
            f,
            "abi:      {}.{} (this daemon: {}.{})",
            self.abi_major, self.abi_minor, HOST_ABI.0, HOST_ABI.1
        )?;
        writeln!(
            f,
            "unwind:   {}",
            if self.built_with_unwind {
                "yes"
            } else {
                "no (panic=abort)"
            }
        )?;
        match &self.problem {
            None => write!(f, "loadable: yes"),
            Some(problem) => write!(f, "loadable: no: {problem}"),
        }
    }
}

/// Opens `path`, calls its entry point and reads what it declares. Errors only when
/// nothing can be read at all; an incompatible plugin yields metadata whose
/// `problem` says why. Like [`load`], this runs the library's initialisers and never
/// unloads it.
pub fn inspect(path: &Path) -> Result<Metadata, LoadError> {
    read(path).map(|(metadata, _)| metadata)
}

/// Loads a plugin for use, refusing anything this host cannot run safely: a wrong
/// magic or ABI version, wrong structure sizes, a `panic = "abort"` build. Every
/// error message names the file. The library is never unloaded.
pub fn load(path: &Path) -> Result<Plugin, LoadError> {
    let (metadata, checked) = read(path)?;
    let checked = checked?;
    Ok(Plugin {
        inner: Arc::new(PluginInner {
            metadata,
            entry: checked.entry,
            vtable: checked.vtable,
        }),
    })
}

struct Checked {
    entry: ffi::Entry,
    vtable: &'static abi::PluginVTable,
}

fn read(path: &Path) -> Result<(Metadata, Result<Checked, LoadError>), LoadError> {
    let library = ffi::open(path).map_err(|reason| LoadError::Open {
        path: path.to_owned(),
        reason,
    })?;
    let Some(entry) = ffi::entry(library) else {
        let hint = (2..=9)
            .find(|major| ffi::exports_major(library, *major))
            .map(|major| format!("; it exports `caremsg_gateway_v{major}`, for ABI {major}"))
            .unwrap_or_default();
        return Err(LoadError::NoEntry {
            path: path.to_owned(),
            hint,
        });
    };
    let (host_major, host_minor) = HOST_ABI;
    let Some(raw) = entry.call(host_major, host_minor) else {
        return Err(LoadError::Refused {
            path: path.to_owned(),
            host_major,
            host_minor,
        });
    };
    let header = raw.header();
    if header.magic != abi::MAGIC {
        return Err(LoadError::BadMagic {
            path: path.to_owned(),
            magic: header.magic,
        });
    }
    let mut metadata = Metadata {
        path: path.to_owned(),
        abi_major: header.abi_major,
        abi_minor: header.abi_minor,
        built_with_unwind: header.flags & abi::flags::BUILT_WITH_UNWIND != 0,
        name: None,
        version: None,
        sdk_version: None,
        kind: None,
        problem: None,
    };
    let checked = check(path, raw, &mut metadata);
    if let Err(error) = &checked {
        metadata.problem = Some(error.to_string());
    }
    Ok((metadata, checked.map(|vtable| Checked { entry, vtable })))
}

/// Validates a declaration, filling in `metadata` as far as it can be trusted.
fn check(
    path: &Path,
    raw: ffi::RawDeclaration,
    metadata: &mut Metadata,
) -> Result<&'static abi::PluginVTable, LoadError> {
    let header = raw.header();
    compat::check_header(path, &header)?;
    let declaration = raw.declaration();
    metadata.name = ffi::static_str(declaration.name);
    metadata.version = ffi::static_str(declaration.version);
    metadata.sdk_version = ffi::static_str(declaration.sdk_version);
    metadata.kind = Kind::from_u32(declaration.kind);
    compat::check_sizes(path, header.abi_minor, &StructSizes::of(declaration))?;
    compat::check_flags(path, header.flags)?;
    let malformed = |what: &str| LoadError::Malformed {
        path: path.to_owned(),
        what: what.to_owned(),
    };
    if metadata.name.as_deref().is_none_or(str::is_empty) {
        return Err(malformed("its name is missing or not UTF-8"));
    }
    if metadata.version.is_none() {
        return Err(malformed("its version is missing or not UTF-8"));
    }
    if metadata.kind.is_none() {
        return Err(malformed(&format!("unknown kind {}", declaration.kind)));
    }
    ffi::vtable(declaration).ok_or_else(|| malformed("its vtable is null"))
}

/// A loaded, compatible plugin. Cheap to clone; the library stays loaded forever.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    /// What the plugin declared.
    metadata: Metadata,
    /// Kept to re-run the handshake ([`Plugin::entry_accepts`]).
    entry: ffi::Entry,
    /// The plugin's functions.
    vtable: &'static abi::PluginVTable,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("metadata", &self.inner.metadata)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// What the plugin declared.
    pub fn metadata(&self) -> &Metadata {
        &self.inner.metadata
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        self.inner.metadata.name.as_deref().unwrap_or_default()
    }

    /// The plugin's kind.
    pub fn kind(&self) -> Kind {
        // `load` refuses declarations of unknown kind, so this is always `Some`.
        self.inner.metadata.kind.unwrap_or(Kind::Sms)
    }

    /// Calls the entry point again with another host version and reports whether the
    /// plugin accepted it (the testkit's check that a wrong major is refused).
    pub fn entry_accepts(&self, host_major: u32, host_minor: u32) -> bool {
        self.inner.entry.call(host_major, host_minor).is_some()
    }

    /// Starts an instance named `instance_name` with its JSON configuration.
    /// `services` serve its emits, logs and HTTP requests until it is stopped.
    pub fn start(
        &self,
        instance_name: &str,
        config_json: &str,
        services: Arc<dyn HostServices>,
    ) -> Result<Instance, StartError> {
        let name: Arc<str> = Arc::from(instance_name);
        let ctx = HostCtx::leak(name.clone(), services);
        match ffi::start(self.inner.vtable, config_json, ctx) {
            Ok(raw) => Ok(Instance {
                plugin: self.clone(),
                name,
                ctx,
                raw: RwLock::new(Some(raw)),
                webhook_event_limit: AtomicUsize::new(DEFAULT_WEBHOOK_EVENT_LIMIT),
            }),
            Err(error) => {
                ctx.retire();
                Err(error)
            }
        }
    }
}

/// A started plugin instance. Its methods are synchronous and may block: call them
/// on a blocking thread (`tokio::task::spawn_blocking`), never on an async worker.
/// They may run concurrently; [`Instance::stop`] waits for calls in flight, and every
/// call after it fails with [`CallError::Stopped`]. Dropping an instance stops it.
pub struct Instance {
    /// Keeps the plugin's metadata at hand.
    plugin: Plugin,
    /// The configured instance name.
    name: Arc<str>,
    /// The leaked host-services context of this instance.
    ctx: &'static HostCtx,
    /// `Some` until stopped; readers are calls, the writer is `stop`.
    raw: RwLock<Option<RawInstance>>,
    /// See [`Instance::set_webhook_event_limit`].
    webhook_event_limit: AtomicUsize,
}

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instance")
            .field("name", &self.name)
            .field("plugin", &self.plugin.name())
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl Instance {
    /// The instance name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin it runs.
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    fn with_raw<T>(
        &self,
        call: impl FnOnce(&RawInstance) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        let guard = self.raw.read().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(raw) => call(raw),
            None => Err(CallError::Stopped),
        }
    }

    /// Sends one message.
    pub fn send(&self, message: &Outbound) -> Result<SendOutcome, CallError> {
        self.with_raw(|raw| raw.send(message))
    }

    /// Handles a provider webhook. Commit `events` of the result before answering
    /// with its `response`.
    pub fn handle_webhook(&self, request: &WebhookRequest) -> Result<WebhookOutcome, CallError> {
        self.with_raw(|raw| {
            let call = CallCtx::new(self.webhook_event_limit.load(Ordering::Relaxed));
            let response = raw.handle_webhook(request, &call);
            let events = call.into_events();
            response.map(|response| WebhookOutcome { response, events })
        })
    }

    /// How many events one webhook call may emit before the plugin is told busy.
    /// Set it to 0 while the daemon cannot commit events: well-behaved plugins then
    /// answer with a status that makes the provider retry.
    pub fn set_webhook_event_limit(&self, limit: usize) {
        self.webhook_event_limit.store(limit, Ordering::Relaxed);
    }

    /// Asks the plugin for its health.
    pub fn health(&self) -> Result<Health, CallError> {
        self.with_raw(RawInstance::health)
    }

    /// Stops the instance: waits for calls in flight, lets the plugin join its
    /// threads and free itself, then refuses any later service call from it. Fails
    /// with [`CallError::Stopped`] when already stopped.
    pub fn stop(&self) -> Result<(), CallError> {
        let mut guard = self.raw.write().unwrap_or_else(PoisonError::into_inner);
        let raw = guard.take().ok_or(CallError::Stopped)?;
        let result = raw.stop();
        self.ctx.retire();
        result
    }

    /// Whether the instance is stopped.
    pub fn is_stopped(&self) -> bool {
        self.raw
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    /// How many service calls (emit, log, http) the plugin made after it was stopped.
    /// Anything but 0 is a plugin bug: its threads outlived `stop`.
    pub fn calls_after_stop(&self) -> u64 {
        self.ctx.calls_after_stop()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if !self.is_stopped()
            && let Err(error) = self.stop()
        {
            tracing::warn!(instance = %self.name, %error, "The plugin failed while being stopped.");
        }
    }
}
