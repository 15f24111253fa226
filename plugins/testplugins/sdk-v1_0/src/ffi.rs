//! The SDK's only unsafe code: buffers, the safe [`Host`] handle over the host's
//! services table, and the `extern "C"` shims [`crate::export_plugin!`] instantiates.
//!
//! Every shim runs the author's code inside `catch_unwind`, so a panic becomes
//! [`abi::call::PANICKED`] instead of unwinding into the host (which would abort the
//! process). A panic hook installed on the first handshake records only the panic's
//! location, never its message, because messages may contain patient data.

// The FFI boundary cannot be written without `unsafe`; this module and the host's
// loader are the only places in caremsg that contain it.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::str::FromStr;
use std::sync::Once;

use crate::abi::{self, Buffer, Slice};
use crate::gateway::{
    EmitStatus, Event, Gateway, Health, HttpRequest, HttpResponse, Level, Outbound, SendResult,
    WebhookRequest, WebhookResponse,
};
use crate::headers::{self, Headers};

// SAFETY: a declaration is immutable `'static` data: its pointers refer to `'static`
// strings and a `'static` vtable, so sharing it between threads is sound.
unsafe impl Sync for abi::PluginDeclaration {}
// SAFETY: as above; the host keeps `&'static PluginDeclaration` on several threads.
unsafe impl Send for abi::PluginDeclaration {}

impl Slice {
    /// The borrowed bytes, or `None` when absent.
    ///
    /// # Safety
    /// `ptr` must be null or point to `len` readable bytes that stay valid and
    /// unchanged for `'a` (the ABI guarantees this for the duration of a call).
    pub unsafe fn as_bytes<'a>(&self) -> Option<&'a [u8]> {
        if self.ptr.is_null() {
            None
        } else {
            // SAFETY: the caller's contract.
            Some(unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
        }
    }

    /// The borrowed text; `Ok(None)` when absent, `Err` when not UTF-8.
    ///
    /// # Safety
    /// As for [`Slice::as_bytes`].
    pub unsafe fn as_str<'a>(&self) -> Result<Option<&'a str>, std::str::Utf8Error> {
        // SAFETY: the caller's contract.
        match unsafe { self.as_bytes() } {
            None => Ok(None),
            Some(bytes) => std::str::from_utf8(bytes).map(Some),
        }
    }
}

/// Frees a buffer made by [`Buffer::from_vec`] in this binary.
unsafe extern "C" fn free_vec(ptr: *mut u8, len: usize, cap: usize) {
    if !ptr.is_null() {
        // SAFETY: `ptr, len, cap` came from a `Vec<u8>` of this binary's allocator
        // (see `Buffer::from_vec`) and are freed exactly once (`Buffer` is not `Clone`
        // and is reset to absent after freeing).
        drop(unsafe { Vec::from_raw_parts(ptr, len, cap) });
    }
}

impl Buffer {
    /// An absent buffer; also the initial value of every out-parameter buffer.
    pub const EMPTY: Buffer = Buffer {
        ptr: std::ptr::null_mut(),
        len: 0,
        cap: 0,
        free: None,
    };

    /// Hands `bytes` over, with this binary's free function.
    pub fn from_vec(bytes: Vec<u8>) -> Buffer {
        let mut bytes = ManuallyDrop::new(bytes);
        Buffer {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            cap: bytes.capacity(),
            free: Some(free_vec),
        }
    }

    /// Hands a string over.
    pub fn from_string(text: String) -> Buffer {
        Buffer::from_vec(text.into_bytes())
    }

    /// Hands an optional string over; `None` becomes absent.
    pub fn from_opt_string(text: Option<String>) -> Buffer {
        text.map_or(Buffer::EMPTY, Buffer::from_string)
    }

    /// Whether the buffer is absent.
    pub fn is_absent(&self) -> bool {
        self.ptr.is_null()
    }

    /// Copies the bytes out and frees the buffer, leaving it absent. `None` if it was absent.
    pub fn take(&mut self) -> Option<Vec<u8>> {
        if self.ptr.is_null() {
            return None;
        }
        // SAFETY: a non-null buffer was made by `from_vec` (here or in the other
        // binary, whose `free` it carries) and written into this out-parameter by a
        // conforming party: `ptr` points to `len` initialised bytes until freed.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec();
        self.release();
        Some(bytes)
    }

    /// Copies the bytes out as text (invalid UTF-8 replaced) and frees the buffer.
    pub fn take_string(&mut self) -> Option<String> {
        self.take().map(|bytes| match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn release(&mut self) {
        let (ptr, len, cap, free) = (self.ptr, self.len, self.cap, self.free);
        // Reset field by field: assigning a whole `Buffer` would drop the old one here.
        self.ptr = std::ptr::null_mut();
        self.len = 0;
        self.cap = 0;
        self.free = None;
        if let (false, Some(free)) = (ptr.is_null(), free) {
            // SAFETY: `free` is the producer's own function for exactly this allocation,
            // called once because `self` is now absent.
            unsafe { free(ptr, len, cap) };
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.release();
    }
}

/// The plugin's handle to the host's services: emit events, log, do HTTP.
///
/// `Copy`, `Send` and `Sync`; valid from [`Gateway::start`] until [`Gateway::stop`]
/// returns. Calls after that are refused by the host (and counted as a conformance
/// failure by the testkit).
#[derive(Clone, Copy, Debug)]
pub struct Host {
    table: *const abi::HostServicesTable,
}

// SAFETY: the host-services table is immutable and every function in it is
// thread-safe by the ABI's contract.
unsafe impl Send for Host {}
// SAFETY: as above.
unsafe impl Sync for Host {}

impl Host {
    fn table(&self) -> &abi::HostServicesTable {
        // SAFETY: `table` was non-null at construction (`start` checks) and the host
        // keeps it valid for the instance's life (ABI contract).
        unsafe { &*self.table }
    }

    /// Hands an event to the host outside any webhook call (for example from a
    /// polling thread). Never blocks; on [`EmitStatus::Busy`] try again later.
    ///
    /// Inside [`Gateway::handle_webhook`], use its `events` instead.
    pub fn emit(&self, event: &Event<'_>) -> EmitStatus {
        self.emit_in(std::ptr::null(), event)
    }

    fn emit_in(&self, call: *const c_void, event: &Event<'_>) -> EmitStatus {
        let raw = event.to_abi();
        let table = self.table();
        // SAFETY: `raw` borrows from `event`, alive for the call; the table's contract.
        EmitStatus::from_u32(unsafe { (table.emit)(table.ctx, call, &raw) })
    }

    /// Writes a line to the daemon's log, tagged with the instance name. Never PHI.
    pub fn log(&self, level: Level, message: &str) {
        let table = self.table();
        // SAFETY: `message` is alive for the call; the table's contract.
        unsafe { (table.log)(table.ctx, level.as_u32(), Slice::from_text(message)) }
    }

    /// [`Host::log`] at [`Level::Error`].
    pub fn error(&self, message: &str) {
        self.log(Level::Error, message);
    }

    /// [`Host::log`] at [`Level::Warn`].
    pub fn warn(&self, message: &str) {
        self.log(Level::Warn, message);
    }

    /// [`Host::log`] at [`Level::Info`].
    pub fn info(&self, message: &str) {
        self.log(Level::Info, message);
    }

    /// [`Host::log`] at [`Level::Debug`].
    pub fn debug(&self, message: &str) {
        self.log(Level::Debug, message);
    }

    /// Performs an HTTP request with the daemon's client (its timeouts, its
    /// per-instance host allow-list). Blocks the calling thread.
    pub fn http(&self, request: &HttpRequest<'_>) -> Result<HttpResponse, String> {
        let header_block = headers::encode(request.headers.iter().map(|(n, v)| (*n, v.as_bytes())));
        let timeout_ms = request.timeout.map_or(0, |t| {
            u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        let raw = abi::HttpRequest {
            method: Slice::from_text(request.method),
            url: Slice::from_text(request.url),
            headers: Slice::from_bytes(&header_block),
            body: Slice::from_bytes(request.body),
            timeout_ms,
        };
        let mut out = abi::HttpResponse {
            status: 0,
            headers: Buffer::EMPTY,
            body: Buffer::EMPTY,
            error: Buffer::EMPTY,
        };
        let table = self.table();
        // SAFETY: `raw` and what it borrows are alive for the call; `out` is a valid,
        // initialised out-parameter; the table's contract.
        let status = unsafe { (table.http)(table.ctx, &raw, &mut out) };
        if status != abi::call::OK {
            return Err(out
                .error
                .take_string()
                .unwrap_or_else(|| "The host's HTTP service failed without a reason.".to_owned()));
        }
        let status = u16::try_from(out.status)
            .map_err(|_| format!("The host returned HTTP status {}.", out.status))?;
        let header_block = out.headers.take().unwrap_or_default();
        Ok(HttpResponse {
            status,
            headers: Headers::new(&header_block).to_owned_pairs(),
            body: out.body.take().unwrap_or_default(),
        })
    }
}

/// Where [`Gateway::handle_webhook`] emits the events its request reports. They
/// travel back to the host with the response, and the host commits them before it
/// answers the provider. Not `Send`: it belongs to the call.
#[derive(Debug)]
pub struct WebhookEvents<'a> {
    host: Host,
    call: *const c_void,
    _call: PhantomData<&'a ()>,
}

impl WebhookEvents<'_> {
    /// Adds an event to this call's batch. [`EmitStatus::Busy`] means the host cannot
    /// take more now: answer the provider with a status that makes it retry.
    pub fn emit(&mut self, event: &Event<'_>) -> EmitStatus {
        self.host.emit_in(self.call, event)
    }

    /// The instance's host handle, for logging.
    pub fn host(&self) -> Host {
        self.host
    }
}

/// What the SDK allocates for each started instance.
struct Instance<G> {
    gateway: G,
    host: Host,
}

thread_local! {
    /// Whether this thread is inside an export (so a panic is reported by the shim).
    static IN_EXPORT: Cell<bool> = const { Cell::new(false) };
    /// Where the last panic on this thread happened, for the shim to log.
    static PANIC_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

static PANIC_HOOK: Once = Once::new();

/// Replaces the plugin's panic hook (a cdylib has its own copy of `std`, hence its
/// own hook) with one that never prints the panic message, which may hold PHI.
fn install_panic_hook() {
    PANIC_HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let at = info.location().map_or_else(
                || "an unknown location".to_owned(),
                |l| format!("{}:{}:{}", l.file(), l.line(), l.column()),
            );
            let in_export = IN_EXPORT.try_with(Cell::get).unwrap_or(false);
            if in_export {
                let _ = PANIC_AT.try_with(|slot| slot.try_borrow_mut().map(|mut s| *s = Some(at)));
            } else {
                eprintln!(
                    "caremsg plugin: a plugin thread panicked at {at}; the message is withheld because it may contain patient data."
                );
            }
        }));
    });
}

/// Runs one export: catches panics, logs where they happened through the host.
fn guarded(export: &str, host: Option<Host>, body: impl FnOnce() -> u32) -> u32 {
    let outer = IN_EXPORT.replace(true);
    let result = catch_unwind(AssertUnwindSafe(body));
    IN_EXPORT.set(outer);
    match result {
        Ok(status) => status,
        Err(payload) => {
            // Dropping a panic payload can itself panic; keep that inside too.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            let at = PANIC_AT
                .with(|slot| slot.take())
                .unwrap_or_else(|| "an unknown location".to_owned());
            if let Some(host) = host {
                let _ = catch_unwind(AssertUnwindSafe(|| {
                    host.error(&format!(
                        "The plugin panicked in {export} at {at}; the call failed cleanly."
                    ));
                }));
            }
            abi::call::PANICKED
        }
    }
}

/// The body of the entry symbol: the SDK serves exactly its own major version.
#[doc(hidden)]
pub fn entry(
    declaration: &'static abi::PluginDeclaration,
    host_major: u32,
    _host_minor: u32,
) -> *const abi::PluginDeclaration {
    // The host checks the minor version and struct sizes itself, with better messages.
    let _ = catch_unwind(install_panic_hook);
    if host_major == abi::ABI_MAJOR {
        declaration
    } else {
        std::ptr::null()
    }
}

/// The vtable for `G`.
#[doc(hidden)]
pub const fn vtable<G: Gateway>() -> abi::PluginVTable {
    abi::PluginVTable {
        start: start::<G>,
        send: send::<G>,
        handle_webhook: handle_webhook::<G>,
        health: health::<G>,
        stop: stop::<G>,
    }
}

/// # Safety
/// `instance` must come from `start::<G>` and not be stopped (ABI contract).
unsafe fn instance<'a, G>(instance: *const c_void) -> &'a Instance<G> {
    // SAFETY: the caller's contract.
    unsafe { &*instance.cast::<Instance<G>>() }
}

unsafe extern "C" fn start<G: Gateway>(
    config: Slice,
    host: *const abi::HostServicesTable,
    out_instance: *mut *mut c_void,
    out_error: *mut Buffer,
) -> u32 {
    if host.is_null() || out_instance.is_null() || out_error.is_null() {
        return abi::call::INVALID_INPUT;
    }
    let host = Host { table: host };
    guarded("start", Some(host), || {
        // SAFETY: `config` is borrowed for the call (ABI contract).
        let config = match unsafe { config.as_str() } {
            Ok(text) => text.unwrap_or(""),
            Err(_) => return abi::call::INVALID_INPUT,
        };
        match G::start(config, host) {
            Ok(gateway) => {
                let boxed = Box::new(Instance { gateway, host });
                // SAFETY: `out_instance` is a valid out-parameter (checked non-null).
                unsafe { out_instance.write(Box::into_raw(boxed).cast()) };
                abi::call::OK
            }
            Err(message) => {
                // SAFETY: `out_error` is a valid out-parameter (checked non-null)
                // holding `Buffer::EMPTY`, so overwriting it leaks nothing.
                unsafe { out_error.write(Buffer::from_string(message)) };
                abi::call::ERROR
            }
        }
    })
}

/// # Safety
/// `raw` must be a valid outbound record whose slices are alive for `'a`.
unsafe fn outbound<'a>(raw: &abi::Outbound) -> Option<Outbound<'a>> {
    // SAFETY: the caller's contract, for every field.
    unsafe {
        Some(Outbound {
            delivery_id: raw.delivery_id.as_str().ok()?.unwrap_or(""),
            to: raw.to.as_str().ok()?.unwrap_or(""),
            from: raw.from.as_str().ok()?.unwrap_or(""),
            body: raw.body.as_str().ok()?.unwrap_or(""),
            idempotency_key: raw.idempotency_key.as_str().ok()?.unwrap_or(""),
            subject: raw.subject.as_str().ok()?,
            attempt: raw.attempt,
        })
    }
}

fn send_result(result: SendResult) -> abi::SendResult {
    let mut raw = abi::SendResult {
        kind: 0,
        retry_after_ms: abi::RETRY_AFTER_NONE,
        provider_id: Buffer::EMPTY,
        code: Buffer::EMPTY,
        reason: Buffer::EMPTY,
    };
    match result {
        SendResult::Sent { provider_id } => {
            raw.kind = abi::send::SENT;
            raw.provider_id = Buffer::from_string(provider_id);
        }
        SendResult::Retryable {
            after,
            code,
            reason,
        } => {
            raw.kind = abi::send::RETRYABLE;
            raw.retry_after_ms = after.map_or(abi::RETRY_AFTER_NONE, |d| {
                u64::try_from(d.as_millis()).unwrap_or(abi::RETRY_AFTER_NONE - 1)
            });
            raw.code = Buffer::from_opt_string(code);
            raw.reason = Buffer::from_string(reason);
        }
        SendResult::Permanent { code, reason } => {
            raw.kind = abi::send::PERMANENT;
            raw.code = Buffer::from_string(code);
            raw.reason = Buffer::from_string(reason);
        }
        SendResult::Unsubscribed { reason } => {
            raw.kind = abi::send::UNSUBSCRIBED;
            raw.reason = Buffer::from_string(reason);
        }
    }
    raw
}

unsafe extern "C" fn send<G: Gateway>(
    instance_ptr: *const c_void,
    outbound_ptr: *const abi::Outbound,
    out: *mut abi::SendResult,
) -> u32 {
    if instance_ptr.is_null() || outbound_ptr.is_null() || out.is_null() {
        return abi::call::INVALID_INPUT;
    }
    // SAFETY: ABI contract: a live instance from `start::<G>`.
    let instance = unsafe { instance::<G>(instance_ptr) };
    guarded("send", Some(instance.host), || {
        // SAFETY: ABI contract: the record and its slices live for the call.
        let Some(message) = (unsafe { outbound(&*outbound_ptr) }) else {
            return abi::call::INVALID_INPUT;
        };
        let result = send_result(instance.gateway.send(&message));
        // SAFETY: `out` is a valid out-parameter holding empty buffers.
        unsafe { out.write(result) };
        abi::call::OK
    })
}

/// # Safety
/// `raw` must be a valid request record whose slices are alive for `'a`.
unsafe fn webhook_request<'a>(raw: &abi::WebhookRequest) -> Option<WebhookRequest<'a>> {
    // SAFETY: the caller's contract, for every field.
    unsafe {
        Some(WebhookRequest {
            method: raw.method.as_str().ok()?.unwrap_or(""),
            public_url: raw.public_url.as_str().ok()?.unwrap_or(""),
            remote_addr: raw
                .remote_addr
                .as_str()
                .ok()?
                .and_then(|text| std::net::SocketAddr::from_str(text).ok()),
            headers: Headers::new(raw.headers.as_bytes().unwrap_or_default()),
            body: raw.body.as_bytes().unwrap_or_default(),
        })
    }
}

fn webhook_response(response: WebhookResponse) -> abi::WebhookResponse {
    let block = headers::encode(
        response
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes())),
    );
    abi::WebhookResponse {
        status: u32::from(response.status),
        headers: Buffer::from_vec(block),
        body: Buffer::from_vec(response.body),
    }
}

unsafe extern "C" fn handle_webhook<G: Gateway>(
    instance_ptr: *const c_void,
    request_ptr: *const abi::WebhookRequest,
    out: *mut abi::WebhookResponse,
) -> u32 {
    if instance_ptr.is_null() || request_ptr.is_null() || out.is_null() {
        return abi::call::INVALID_INPUT;
    }
    // SAFETY: ABI contract: a live instance from `start::<G>`.
    let instance = unsafe { instance::<G>(instance_ptr) };
    guarded("handle_webhook", Some(instance.host), || {
        // SAFETY: ABI contract: the record and its slices live for the call.
        let raw = unsafe { &*request_ptr };
        // SAFETY: as above.
        let Some(request) = (unsafe { webhook_request(raw) }) else {
            return abi::call::INVALID_INPUT;
        };
        let mut events = WebhookEvents {
            host: instance.host,
            call: raw.call,
            _call: PhantomData,
        };
        let response = webhook_response(instance.gateway.handle_webhook(&request, &mut events));
        // SAFETY: `out` is a valid out-parameter holding empty buffers.
        unsafe { out.write(response) };
        abi::call::OK
    })
}

unsafe extern "C" fn health<G: Gateway>(
    instance_ptr: *const c_void,
    out: *mut abi::HealthReport,
) -> u32 {
    if instance_ptr.is_null() || out.is_null() {
        return abi::call::INVALID_INPUT;
    }
    // SAFETY: ABI contract: a live instance from `start::<G>`.
    let instance = unsafe { instance::<G>(instance_ptr) };
    guarded("health", Some(instance.host), || {
        let report = match instance.gateway.health() {
            Health::Ok => abi::HealthReport {
                status: abi::health::OK,
                detail: Buffer::EMPTY,
            },
            Health::Degraded(why) => abi::HealthReport {
                status: abi::health::DEGRADED,
                detail: Buffer::from_string(why),
            },
            Health::Down(why) => abi::HealthReport {
                status: abi::health::DOWN,
                detail: Buffer::from_string(why),
            },
        };
        // SAFETY: `out` is a valid out-parameter holding an empty buffer.
        unsafe { out.write(report) };
        abi::call::OK
    })
}

unsafe extern "C" fn stop<G: Gateway>(instance_ptr: *mut c_void) -> u32 {
    if instance_ptr.is_null() {
        return abi::call::INVALID_INPUT;
    }
    // SAFETY: ABI contract: a live instance from `start::<G>`, stopped exactly once,
    // after every other call on it has returned; we take back the `Box`.
    let boxed = unsafe { Box::from_raw(instance_ptr.cast::<Instance<G>>()) };
    let host = boxed.host;
    guarded("stop", Some(host), move || {
        boxed.gateway.stop();
        abi::call::OK
    })
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use std::time::Duration;

    fn retry_after_ms(after: Option<Duration>) -> u64 {
        send_result(SendResult::Retryable {
            after,
            code: None,
            reason: String::new(),
        })
        .retry_after_ms
    }

    #[test]
    fn buffers_round_trip_and_free_once() {
        let mut buffer = Buffer::from_string("hello".to_owned());
        assert!(!buffer.is_absent());
        assert_eq!(buffer.take().as_deref(), Some(&b"hello"[..]));
        assert!(buffer.is_absent());
        assert_eq!(buffer.take(), None);
        assert!(Buffer::from_opt_string(None).is_absent());
        drop(Buffer::from_vec(vec![1, 2, 3]));
    }

    #[test]
    fn slices_distinguish_absent_from_empty() {
        // SAFETY: the slices borrow live data.
        unsafe {
            assert_eq!(Slice::NONE.as_str(), Ok(None));
            assert_eq!(Slice::from_text("").as_str(), Ok(Some("")));
            assert!(Slice::from_bytes(&[0xff]).as_str().is_err());
        }
    }

    #[test]
    fn retry_hints_cross_as_milliseconds() {
        assert_eq!(retry_after_ms(None), abi::RETRY_AFTER_NONE);
        assert_eq!(retry_after_ms(Some(Duration::from_millis(1500))), 1500);
    }
}
