//! The host's only unsafe code: opening libraries, calling the entry point and the
//! vtable, and the `extern "C"` host services a plugin calls back into.
//!
//! Everything here turns raw pointers into owned values at the boundary; the rest of
//! the crate is safe Rust. Libraries are leaked on purpose: a plugin's code may run
//! on threads or in destructors we cannot see, so unloading it is never safe. A new
//! `.so` means a restart.
//!
//! The host-services context of each started instance ([`HostCtx`]) is leaked too
//! (a few hundred bytes per start): a misbehaving plugin thread that outlives `stop`
//! still finds valid memory, and its late calls are refused and counted instead of
//! touching freed memory.

// Loading and calling native code cannot be written without `unsafe`; this module and
// the SDK's export shims are the only places in caremsg that contain it.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use caremsg_plugin_sdk::abi::{self, Buffer, DeclarationHeader, Slice};
use caremsg_plugin_sdk::headers::{self, Headers};
use libloading::Library;

use crate::error::{CallError, StartError};
use crate::types::{
    EmitOutcome, Event, Health, HostServices, HttpRequest, Level, Outbound, ReceiptStatus,
    SendOutcome, WebhookRequest, WebhookResponse,
};

/// Opens a library and leaks it (never unloaded).
///
/// Loading runs the library's initialisers: only trusted files may be passed.
pub(crate) fn open(path: &Path) -> Result<&'static Library, String> {
    // SAFETY: loading a library runs its initialisers; the daemon only loads plugin
    // files named in its own configuration, which are trusted code by definition.
    let library = unsafe { Library::new(path) }.map_err(|e| describe(&e))?;
    Ok(Box::leak(Box::new(library)))
}

fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The entry point of a v1 plugin, if the library exports it.
#[derive(Clone, Copy)]
pub(crate) struct Entry(abi::EntryFn);

pub(crate) fn entry(library: &'static Library) -> Option<Entry> {
    // SAFETY: the symbol, if present, has the ABI v1 entry type; the library is
    // leaked, so the function pointer stays valid forever.
    unsafe { library.get::<abi::EntryFn>(abi::ENTRY_SYMBOL) }
        .ok()
        .map(|symbol| Entry(*symbol))
}

/// Whether the library exports the entry symbol of ABI major `major`.
pub(crate) fn exports_major(library: &'static Library, major: u32) -> bool {
    let name = format!("caremsg_gateway_v{major}");
    // SAFETY: we only test for the symbol's presence and never call it.
    unsafe { library.get::<*const c_void>(name.as_str()) }.is_ok()
}

/// A declaration returned by the entry point: `'static` (the library is leaked).
#[derive(Clone, Copy)]
pub(crate) struct RawDeclaration(*const abi::PluginDeclaration);

impl Entry {
    /// Calls the entry point; `None` when it refuses this version.
    pub(crate) fn call(self, host_major: u32, host_minor: u32) -> Option<RawDeclaration> {
        // SAFETY: the entry point takes two integers and returns a pointer; a
        // conforming plugin never unwinds out of it (the SDK catches panics).
        let declaration = unsafe { (self.0)(host_major, host_minor) };
        (!declaration.is_null()).then_some(RawDeclaration(declaration))
    }
}

impl RawDeclaration {
    /// The frozen header, which every declaration of every major version starts with.
    pub(crate) fn header(self) -> DeclarationHeader {
        // SAFETY: a non-null declaration starts with the frozen header (ABI rule);
        // `read_unaligned` tolerates a misaligned pointer from a broken plugin.
        unsafe { self.0.cast::<DeclarationHeader>().read_unaligned() }
    }

    /// The whole v1 declaration. Only call after `compat::check_header` accepted the
    /// header, which guarantees the plugin's declaration is at least this large.
    pub(crate) fn declaration(self) -> &'static abi::PluginDeclaration {
        // SAFETY: the header check established major 1 and a size equal to ours; the
        // declaration is `'static` in a leaked library.
        unsafe { &*self.0 }
    }
}

/// Reads a `'static` string of the declaration.
pub(crate) fn static_str(slice: Slice) -> Option<String> {
    // SAFETY: declaration strings are `'static` in a leaked library (ABI rule).
    unsafe { slice.as_str() }.ok().flatten().map(str::to_owned)
}

/// The vtable of a checked declaration.
pub(crate) fn vtable(
    declaration: &'static abi::PluginDeclaration,
) -> Option<&'static abi::PluginVTable> {
    // SAFETY: the size checks established the vtable's layout; it is `'static` in a
    // leaked library. Null is refused.
    unsafe { declaration.vtable.as_ref() }
}

/// The per-instance context behind the host-services table. Leaked: see the module docs.
pub(crate) struct HostCtx {
    /// The table handed to the plugin; its `ctx` points at this struct.
    table: abi::HostServicesTable,
    /// The instance name every service call is tagged with.
    instance: Arc<str>,
    /// The daemon's services; taken away at stop so late calls reach nothing.
    services: RwLock<Option<Arc<dyn HostServices>>>,
    /// Set once `stop` has returned.
    stopped: AtomicBool,
    /// Service calls that arrived after `stop` (a conformance failure).
    calls_after_stop: AtomicU64,
}

// SAFETY: the table is immutable after construction and only holds function pointers
// and a pointer to this (leaked, `'static`) struct; the other fields are Sync.
unsafe impl Sync for HostCtx {}
// SAFETY: as above.
unsafe impl Send for HostCtx {}

impl HostCtx {
    /// Creates and leaks the context of one instance.
    pub(crate) fn leak(instance: Arc<str>, services: Arc<dyn HostServices>) -> &'static HostCtx {
        let ctx: &'static mut HostCtx = Box::leak(Box::new(HostCtx {
            table: abi::HostServicesTable {
                ctx: std::ptr::null(),
                emit: host_emit,
                log: host_log,
                http: host_http,
                hook_url: host_hook_url,
                now_ms: host_now_ms,
            },
            instance,
            services: RwLock::new(Some(services)),
            stopped: AtomicBool::new(false),
            calls_after_stop: AtomicU64::new(0),
        }));
        ctx.table.ctx = std::ptr::from_ref::<HostCtx>(ctx).cast();
        ctx
    }

    /// Marks the instance stopped and releases the daemon's services.
    pub(crate) fn retire(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        *self
            .services
            .write()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Service calls that arrived after stop.
    pub(crate) fn calls_after_stop(&self) -> u64 {
        self.calls_after_stop.load(Ordering::SeqCst)
    }

    /// The services, unless stopped; counts the late call otherwise.
    fn services(&self, what: &str) -> Option<Arc<dyn HostServices>> {
        let services = self
            .services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if services.is_none() || self.stopped.load(Ordering::SeqCst) {
            self.calls_after_stop.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(instance = %self.instance, call = what, "A plugin called the host after it was stopped; the call was refused.");
            return None;
        }
        services
    }
}

/// The per-call context of one webhook call: collects the events it emits.
pub(crate) struct CallCtx {
    /// Events emitted so far.
    events: Mutex<Vec<Event>>,
    /// How many the call may emit before `emit` answers busy.
    limit: usize,
}

impl CallCtx {
    pub(crate) fn new(limit: usize) -> Self {
        CallCtx {
            events: Mutex::new(Vec::new()),
            limit,
        }
    }

    pub(crate) fn into_events(self) -> Vec<Event> {
        self.events
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// # Safety
/// `ctx` must be the `ctx` of a table made by [`HostCtx::leak`].
unsafe fn host_ctx<'a>(ctx: *const c_void) -> &'a HostCtx {
    // SAFETY: the caller's contract; the context is leaked, hence valid forever.
    unsafe { &*ctx.cast::<HostCtx>() }
}

/// # Safety
/// The slice must be borrowed for the call (ABI rule).
unsafe fn text(slice: Slice) -> Option<String> {
    // SAFETY: the caller's contract.
    unsafe { slice.as_str() }.ok().flatten().map(str::to_owned)
}

/// # Safety
/// `raw`'s slices must be borrowed for the call (ABI rule).
unsafe fn read_event(raw: &abi::Event) -> Option<Event> {
    // SAFETY: the caller's contract, for every field.
    unsafe {
        match raw.kind {
            abi::event::INBOUND_MESSAGE => Some(Event::InboundMessage {
                from: text(raw.from)?,
                to: text(raw.to)?,
                body: text(raw.body)?,
                provider_message_id: text(raw.provider_message_id)?,
            }),
            abi::event::DELIVERY_RECEIPT => Some(Event::DeliveryReceipt {
                provider_message_id: text(raw.provider_message_id)?,
                status: ReceiptStatus::from_u32(raw.receipt_status)?,
                error_code: match raw.error_code.as_str() {
                    Ok(code) => code.map(str::to_owned),
                    Err(_) => return None,
                },
            }),
            abi::event::OPT_OUT => Some(Event::OptOut {
                number: text(raw.number)?,
            }),
            _ => None,
        }
    }
}

unsafe extern "C" fn host_emit(
    ctx: *const c_void,
    call: *const c_void,
    event: *const abi::Event,
) -> u32 {
    if ctx.is_null() || event.is_null() {
        return abi::emit::REJECTED;
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the table's `ctx`, as handed to the plugin.
        let ctx = unsafe { host_ctx(ctx) };
        // SAFETY: the event is borrowed for the call (ABI rule).
        let Some(event) = (unsafe { read_event(&*event) }) else {
            tracing::warn!(instance = %ctx.instance, "A plugin emitted a malformed event; it was rejected.");
            return abi::emit::REJECTED;
        };
        if !call.is_null() {
            // SAFETY: a non-null `call` is the `CallCtx` of the webhook call in
            // progress on this instance (ABI rule: valid for that call).
            let call = unsafe { &*call.cast::<CallCtx>() };
            let mut events = call.events.lock().unwrap_or_else(PoisonError::into_inner);
            if events.len() >= call.limit {
                return abi::emit::BUSY;
            }
            events.push(event);
            return abi::emit::ACCEPTED;
        }
        match ctx.services("emit") {
            None => abi::emit::REJECTED,
            Some(services) => match services.emit(&ctx.instance, event) {
                EmitOutcome::Accepted => abi::emit::ACCEPTED,
                EmitOutcome::Busy => abi::emit::BUSY,
            },
        }
    }));
    outcome.unwrap_or(abi::emit::REJECTED)
}

unsafe extern "C" fn host_log(ctx: *const c_void, level: u32, message: Slice) {
    if ctx.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the table's `ctx`, as handed to the plugin.
        let ctx = unsafe { host_ctx(ctx) };
        // SAFETY: the message is borrowed for the call (ABI rule).
        let bytes = unsafe { message.as_bytes() }.unwrap_or_default();
        let message = String::from_utf8_lossy(bytes);
        let level = match level {
            abi::level::ERROR => Level::Error,
            abi::level::WARN => Level::Warn,
            abi::level::INFO => Level::Info,
            abi::level::DEBUG => Level::Debug,
            _ => Level::Trace,
        };
        if let Some(services) = ctx.services("log") {
            services.log(&ctx.instance, level, &message);
        }
    }));
}

unsafe extern "C" fn host_hook_url(ctx: *const c_void, out: *mut Buffer) -> u32 {
    if ctx.is_null() || out.is_null() {
        return abi::call::INVALID_INPUT;
    }
    let url = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the table's `ctx`, as handed to the plugin.
        let ctx = unsafe { host_ctx(ctx) };
        ctx.services("hook_url")
            .and_then(|services| services.hook_url(&ctx.instance))
    }));
    match url {
        Ok(Some(url)) => {
            // SAFETY: `out` is a valid out-parameter holding `Buffer::EMPTY` (ABI rule),
            // so overwriting it leaks nothing.
            unsafe { out.write(Buffer::from_string(url)) };
            abi::call::OK
        }
        Ok(None) | Err(_) => abi::call::ERROR,
    }
}

unsafe extern "C" fn host_now_ms(ctx: *const c_void) -> i64 {
    let now = catch_unwind(AssertUnwindSafe(|| {
        if ctx.is_null() {
            return SystemTime::now();
        }
        // SAFETY: the table's `ctx`, as handed to the plugin.
        let ctx = unsafe { host_ctx(ctx) };
        ctx.services("now")
            .map_or_else(SystemTime::now, |services| services.now())
    }))
    .unwrap_or_else(|_| SystemTime::now());
    match now.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// # Safety
/// `raw`'s slices must be borrowed for the call (ABI rule).
unsafe fn read_http_request(raw: &abi::HttpRequest) -> Option<HttpRequest> {
    // SAFETY: the caller's contract, for every field.
    unsafe {
        Some(HttpRequest {
            method: text(raw.method)?,
            url: text(raw.url)?,
            headers: Headers::new(raw.headers.as_bytes().unwrap_or_default()).to_owned_pairs(),
            body: raw.body.as_bytes().unwrap_or_default().to_vec(),
            timeout: (raw.timeout_ms != 0).then(|| Duration::from_millis(raw.timeout_ms)),
        })
    }
}

unsafe extern "C" fn host_http(
    ctx: *const c_void,
    request: *const abi::HttpRequest,
    out: *mut abi::HttpResponse,
) -> u32 {
    if ctx.is_null() || request.is_null() || out.is_null() {
        return abi::call::INVALID_INPUT;
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the table's `ctx`, as handed to the plugin.
        let ctx = unsafe { host_ctx(ctx) };
        // SAFETY: the request is borrowed for the call (ABI rule).
        let Some(request) = (unsafe { read_http_request(&*request) }) else {
            return Err("The HTTP request is malformed (method and URL must be UTF-8).".to_owned());
        };
        match ctx.services("http") {
            None => Err("The instance is stopped.".to_owned()),
            Some(services) => services.http(&ctx.instance, request),
        }
    }))
    .unwrap_or_else(|_| Err("The host's HTTP service failed.".to_owned()));
    let (status, response) = match result {
        Ok(response) => (
            abi::call::OK,
            abi::HttpResponse {
                status: u32::from(response.status),
                headers: Buffer::from_vec(headers::encode(
                    response
                        .headers
                        .iter()
                        .map(|(n, v)| (n.as_str(), v.as_bytes())),
                )),
                body: Buffer::from_vec(response.body),
                error: Buffer::EMPTY,
            },
        ),
        Err(message) => (
            abi::call::ERROR,
            abi::HttpResponse {
                status: 0,
                headers: Buffer::EMPTY,
                body: Buffer::EMPTY,
                error: Buffer::from_string(message),
            },
        ),
    };
    // SAFETY: `out` is the plugin's out-parameter, initialised with empty buffers
    // (ABI rule), so overwriting leaks nothing.
    unsafe { out.write(response) };
    status
}

/// A started instance: the vtable and the plugin's instance pointer.
pub(crate) struct RawInstance {
    vtable: &'static abi::PluginVTable,
    ptr: *mut c_void,
}

// SAFETY: the plugin's instance is `Send + Sync` (the SDK's `Gateway` bound, an ABI
// rule for hand-written plugins); the vtable is immutable `'static` data.
unsafe impl Send for RawInstance {}
// SAFETY: as above.
unsafe impl Sync for RawInstance {}

fn check_status(call: &'static str, status: u32) -> Result<(), CallError> {
    match status {
        abi::call::OK => Ok(()),
        abi::call::PANICKED => Err(CallError::Panicked { call }),
        abi::call::INVALID_INPUT => Err(CallError::InvalidInput { call }),
        other => Err(CallError::BadOutput {
            call,
            what: format!("unknown call status {other}"),
        }),
    }
}

/// Starts an instance.
pub(crate) fn start(
    vtable: &'static abi::PluginVTable,
    config_json: &str,
    ctx: &'static HostCtx,
) -> Result<RawInstance, StartError> {
    let mut instance: *mut c_void = std::ptr::null_mut();
    let mut error = Buffer::EMPTY;
    // SAFETY: the config is borrowed for the call; the table lives forever (leaked);
    // the out-parameters are valid and initialised.
    let status = unsafe {
        (vtable.start)(
            Slice::from_text(config_json),
            &ctx.table,
            &mut instance,
            &mut error,
        )
    };
    match status {
        abi::call::OK if !instance.is_null() => Ok(RawInstance {
            vtable,
            ptr: instance,
        }),
        abi::call::OK => Err(CallError::BadOutput {
            call: "start",
            what: "no instance".to_owned(),
        }
        .into()),
        abi::call::ERROR => Err(StartError::Refused(
            error
                .take_string()
                .unwrap_or_else(|| "no reason given".to_owned()),
        )),
        other => Err(check_status("start", other)
            .err()
            .unwrap_or(CallError::BadOutput {
                call: "start",
                what: "unexpected status".to_owned(),
            })
            .into()),
    }
}

fn string(call: &'static str, field: &str, buffer: &mut Buffer) -> Result<String, CallError> {
    buffer
        .take()
        .ok_or_else(|| CallError::BadOutput {
            call,
            what: format!("{field} is missing"),
        })
        .and_then(|bytes| {
            String::from_utf8(bytes).map_err(|_| CallError::BadOutput {
                call,
                what: format!("{field} is not UTF-8"),
            })
        })
}

impl RawInstance {
    pub(crate) fn send(&self, message: &Outbound) -> Result<SendOutcome, CallError> {
        const CALL: &str = "send";
        let raw = abi::Outbound {
            delivery_id: Slice::from_text(&message.delivery_id),
            to: Slice::from_text(&message.to),
            from: Slice::from_text(&message.from),
            body: Slice::from_text(&message.body),
            idempotency_key: Slice::from_text(&message.idempotency_key),
            subject: Slice::from_opt_text(message.subject.as_deref()),
            attempt: message.attempt,
        };
        let mut out = abi::SendResult {
            kind: u32::MAX,
            retry_after_ms: abi::RETRY_AFTER_NONE,
            provider_id: Buffer::EMPTY,
            code: Buffer::EMPTY,
            reason: Buffer::EMPTY,
        };
        // SAFETY: a live instance (the caller holds the state lock, so it is not
        // stopped); `raw` borrows `message` for the call; `out` is initialised.
        check_status(CALL, unsafe {
            (self.vtable.send)(self.ptr, &raw, &mut out)
        })?;
        Ok(match out.kind {
            abi::send::SENT => SendOutcome::Sent {
                provider_id: string(CALL, "provider_id", &mut out.provider_id)?,
            },
            abi::send::RETRYABLE => SendOutcome::Retryable {
                after: (out.retry_after_ms != abi::RETRY_AFTER_NONE)
                    .then(|| Duration::from_millis(out.retry_after_ms)),
                code: out.code.take_string(),
                reason: out.reason.take_string().unwrap_or_default(),
            },
            abi::send::PERMANENT => SendOutcome::Permanent {
                code: out.code.take_string().unwrap_or_default(),
                reason: out.reason.take_string().unwrap_or_default(),
            },
            abi::send::UNSUBSCRIBED => SendOutcome::Unsubscribed {
                reason: out.reason.take_string().unwrap_or_default(),
            },
            other => {
                return Err(CallError::BadOutput {
                    call: CALL,
                    what: format!("unknown send result {other}"),
                });
            }
        })
    }

    pub(crate) fn handle_webhook(
        &self,
        request: &WebhookRequest,
        call: &CallCtx,
    ) -> Result<WebhookResponse, CallError> {
        const CALL: &str = "handle_webhook";
        let header_block = headers::encode(
            request
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_slice())),
        );
        let remote = request.remote_addr.map(|addr| addr.to_string());
        let raw = abi::WebhookRequest {
            call: std::ptr::from_ref(call).cast(),
            method: Slice::from_text(&request.method),
            public_url: Slice::from_text(&request.public_url),
            remote_addr: Slice::from_opt_text(remote.as_deref()),
            headers: Slice::from_bytes(&header_block),
            body: Slice::from_bytes(&request.body),
        };
        let mut out = abi::WebhookResponse {
            status: 0,
            headers: Buffer::EMPTY,
            body: Buffer::EMPTY,
        };
        // SAFETY: a live instance; `raw` borrows locals and `call` for the call;
        // `out` is initialised.
        check_status(CALL, unsafe {
            (self.vtable.handle_webhook)(self.ptr, &raw, &mut out)
        })?;
        let status = u16::try_from(out.status)
            .ok()
            .filter(|s| (100..=599).contains(s))
            .ok_or_else(|| CallError::BadOutput {
                call: CALL,
                what: format!("HTTP status {}", out.status),
            })?;
        let header_block = out.headers.take().unwrap_or_default();
        Ok(WebhookResponse {
            status,
            headers: Headers::new(&header_block).to_owned_pairs(),
            body: out.body.take().unwrap_or_default(),
        })
    }

    pub(crate) fn health(&self) -> Result<Health, CallError> {
        const CALL: &str = "health";
        let mut out = abi::HealthReport {
            status: u32::MAX,
            detail: Buffer::EMPTY,
        };
        // SAFETY: a live instance; `out` is initialised.
        check_status(CALL, unsafe { (self.vtable.health)(self.ptr, &mut out) })?;
        let detail = out.detail.take_string().unwrap_or_default();
        match out.status {
            abi::health::OK => Ok(Health::Ok),
            abi::health::DEGRADED => Ok(Health::Degraded(detail)),
            abi::health::DOWN => Ok(Health::Down(detail)),
            other => Err(CallError::BadOutput {
                call: CALL,
                what: format!("unknown health status {other}"),
            }),
        }
    }

    /// Stops and frees the plugin's instance; consuming `self` makes a second stop
    /// impossible.
    pub(crate) fn stop(self) -> Result<(), CallError> {
        // SAFETY: a live instance, stopped once (by value), after every other call on
        // it returned (the caller holds the state lock exclusively).
        check_status("stop", unsafe { (self.vtable.stop)(self.ptr) })
    }
}
