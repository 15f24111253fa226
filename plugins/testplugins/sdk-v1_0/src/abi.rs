//! The `#[repr(C)]` ABI v1 shared by the host and every plugin: the declaration, the
//! vtable, the host-services table and the records that cross the boundary.
//!
//! Nothing in this module is needed by a plugin author: [`crate::export_plugin!`] and
//! the safe types of the crate root produce and consume all of it. It is public
//! because the host (`caremsg-plugin-host`) speaks the same ABI from the other side.
//!
//! # Rules of the boundary
//! - **Entry.** A plugin exports `caremsg_gateway_v1(host_major, host_minor)`
//!   ([`ENTRY_SYMBOL`], type [`EntryFn`]). It returns null when it cannot serve a host
//!   of that major version, and otherwise a pointer to a `'static`
//!   [`PluginDeclaration`]. A new major version renames the symbol
//!   (`caremsg_gateway_v2`), so a v1 host never misreads a v2 plugin.
//! - **Frozen header.** [`DeclarationHeader`] (magic, ABI major/minor, declaration
//!   size, flags) never changes, in any major version: the host reads it first and
//!   only then the rest.
//! - **Append-only within a major.** A minor version may only append fields at the
//!   end of a structure, never reorder, resize or remove one. Every structure's size
//!   is declared by the plugin (the `*_size` fields of [`PluginDeclaration`]); the
//!   host refuses a plugin whose minor version is newer than its own, and a plugin
//!   whose declared size of any structure differs from the size the host knows for
//!   that minor version (today, minor 0 only: every size must be equal).
//! - **Enums cross as `u32`** (the constants in the small modules below), never as
//!   Rust enums, so an unknown value is an error, not undefined behaviour.
//! - **Inputs are borrowed** [`Slice`]s, valid only for the duration of the call that
//!   receives them. A null `ptr` means "absent", which differs from empty.
//! - **Outputs are [`Buffer`]s that carry their own free function**, so memory is
//!   always released by the allocator that produced it. Out-parameters are allocated
//!   (zeroed, as [`Buffer::EMPTY`]) by the caller and written by the callee.
//! - **Every call returns a [`call`] status.** Out-parameters are meaningful only when
//!   it is [`call::OK`]. A panic inside the plugin is caught by the SDK and reported as
//!   [`call::PANICKED`]; it never unwinds across the boundary.
//! - No Rust standard-library or tokio type crosses the boundary.

use core::ffi::c_void;

/// The name of the entry symbol of ABI major version 1.
pub const ENTRY_SYMBOL: &str = "caremsg_gateway_v1";

/// The first eight bytes of every declaration: `CAREMSG` and a zero byte, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"CAREMSG\0");

/// The ABI major version this SDK speaks.
pub const ABI_MAJOR: u32 = 1;

/// The ABI minor version this SDK speaks.
pub const ABI_MINOR: u32 = 0;

/// The entry point's type.
pub type EntryFn =
    unsafe extern "C" fn(host_major: u32, host_minor: u32) -> *const PluginDeclaration;

/// Bits of [`DeclarationHeader::flags`].
pub mod flags {
    /// The plugin was compiled with `panic = "unwind"`, so the SDK's `catch_unwind`
    /// around every export works. The host refuses plugins without it: under
    /// `panic = "abort"` a plugin bug would abort the whole daemon.
    pub const BUILT_WITH_UNWIND: u32 = 1 << 0;
}

/// Values of [`PluginDeclaration::kind`].
pub mod kind {
    /// Sends and receives SMS.
    pub const SMS: u32 = 1;
    /// Pushes conversation events to the patient portal's backend.
    pub const PORTAL: u32 = 2;
    /// Sends e-mail.
    pub const EMAIL: u32 = 3;
}

/// Status returned by every vtable call and by the host's `http` service.
pub mod call {
    /// The call succeeded; out-parameters are set.
    pub const OK: u32 = 0;
    /// The call failed cleanly; for `start` and `http` the error buffer says why.
    pub const ERROR: u32 = 1;
    /// The plugin panicked; the SDK caught it. Out-parameters are not set.
    pub const PANICKED: u32 = 2;
    /// The input was malformed (for example a string that is not UTF-8).
    pub const INVALID_INPUT: u32 = 3;
}

/// Values of [`SendResult::kind`].
pub mod send {
    /// The provider accepted the message; `provider_id` holds its id.
    pub const SENT: u32 = 0;
    /// Try again later; `retry_after_ms` may hold the provider's hint.
    pub const RETRYABLE: u32 = 1;
    /// Never retry; `code` and `reason` say why.
    pub const PERMANENT: u32 = 2;
    /// The recipient has unsubscribed at the provider; the host records an opt-out.
    pub const UNSUBSCRIBED: u32 = 3;
}

/// [`SendResult::retry_after_ms`] when the provider gave no hint.
pub const RETRY_AFTER_NONE: u64 = u64::MAX;

/// Values returned by the host's `emit`.
pub mod emit {
    /// The host took the event.
    pub const ACCEPTED: u32 = 0;
    /// The host is saturated; the event was not taken. Never block waiting for it.
    pub const BUSY: u32 = 1;
    /// The event was malformed, or the instance was already stopped.
    pub const REJECTED: u32 = 2;
}

/// Values of [`Event::kind`].
pub mod event {
    /// A message from a patient: `from`, `to`, `body`, `provider_message_id`.
    pub const INBOUND_MESSAGE: u32 = 1;
    /// A delivery receipt: `provider_message_id`, `receipt_status`, `error_code` (optional).
    pub const DELIVERY_RECEIPT: u32 = 2;
    /// The provider reports that `number` opted out.
    pub const OPT_OUT: u32 = 3;
}

/// Values of [`Event::receipt_status`].
pub mod receipt {
    /// Handed to the carrier.
    pub const SENT: u32 = 1;
    /// Delivered to the handset.
    pub const DELIVERED: u32 = 2;
    /// The provider could not send it.
    pub const FAILED: u32 = 3;
    /// The carrier could not deliver it.
    pub const UNDELIVERED: u32 = 4;
}

/// Values of the `level` argument of the host's `log`.
pub mod level {
    /// Something is broken.
    pub const ERROR: u32 = 1;
    /// Something is wrong but work goes on.
    pub const WARN: u32 = 2;
    /// Normal operation.
    pub const INFO: u32 = 3;
    /// Detail for debugging.
    pub const DEBUG: u32 = 4;
    /// Even more detail.
    pub const TRACE: u32 = 5;
}

/// Values of [`HealthReport::status`].
pub mod health {
    /// Working.
    pub const OK: u32 = 0;
    /// Working with reduced capacity; `detail` says why.
    pub const DEGRADED: u32 = 1;
    /// Not working; `detail` says why.
    pub const DOWN: u32 = 2;
}

/// Borrowed bytes, valid for the duration of one call. `ptr == null` means absent.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Slice {
    /// First byte, or null when absent.
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

/// Owned bytes that carry the function that frees them. `ptr == null` means absent.
///
/// Dropping a `Buffer` calls its `free` function; [`Buffer::take`] copies the bytes
/// out and frees it.
#[repr(C)]
#[derive(Debug)]
pub struct Buffer {
    // The fields are private to the crate so that safe code can only make buffers
    // through `Buffer::from_vec`, whose `Drop` and `take` are therefore sound.
    /// First byte, or null when absent.
    pub(crate) ptr: *mut u8,
    /// Number of bytes.
    pub(crate) len: usize,
    /// Allocated capacity, for the producer's `free`.
    pub(crate) cap: usize,
    /// Releases `(ptr, len, cap)` with the producer's allocator.
    pub(crate) free: Option<unsafe extern "C" fn(ptr: *mut u8, len: usize, cap: usize)>,
}

/// The frozen start of every declaration, identical in every ABI major version.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DeclarationHeader {
    /// [`MAGIC`].
    pub magic: u64,
    /// The plugin's ABI major version.
    pub abi_major: u32,
    /// The plugin's ABI minor version.
    pub abi_minor: u32,
    /// `size_of::<PluginDeclaration>()` as the plugin was compiled.
    pub declaration_size: u32,
    /// [`flags`] bits.
    pub flags: u32,
}

/// What a plugin is: returned by the entry point, `'static`, never freed.
#[repr(C)]
#[derive(Debug)]
pub struct PluginDeclaration {
    /// The frozen header.
    pub header: DeclarationHeader,
    /// A [`kind`] value.
    pub kind: u32,
    /// `size_of::<PluginVTable>()` as the plugin was compiled.
    pub vtable_size: u32,
    /// `size_of::<HostServicesTable>()` the plugin expects.
    pub host_services_size: u32,
    /// `size_of::<Outbound>()` the plugin expects.
    pub outbound_size: u32,
    /// `size_of::<SendResult>()` the plugin writes.
    pub send_result_size: u32,
    /// `size_of::<WebhookRequest>()` the plugin expects.
    pub webhook_request_size: u32,
    /// `size_of::<WebhookResponse>()` the plugin writes.
    pub webhook_response_size: u32,
    /// `size_of::<Event>()` the plugin passes to `emit`.
    pub event_size: u32,
    /// `size_of::<HttpRequest>()` the plugin passes to `http`.
    pub http_request_size: u32,
    /// `size_of::<HttpResponse>()` the plugin expects `http` to write.
    pub http_response_size: u32,
    /// `size_of::<HealthReport>()` the plugin writes.
    pub health_size: u32,
    /// The plugin's name (UTF-8, `'static`).
    pub name: Slice,
    /// The plugin's version (UTF-8, `'static`).
    pub version: Slice,
    /// The version of this SDK the plugin was built with (UTF-8, `'static`).
    pub sdk_version: Slice,
    /// The plugin's functions (`'static`).
    pub vtable: *const PluginVTable,
}

/// The plugin's functions. `instance` is the pointer `start` produced.
#[repr(C)]
#[derive(Debug)]
pub struct PluginVTable {
    /// Starts an instance from its JSON configuration. `host` must stay valid until
    /// `stop` has returned. On [`call::OK`] `*out_instance` is set; on
    /// [`call::ERROR`] `*out_error` holds a message (no secrets, no PHI).
    pub start: unsafe extern "C" fn(
        config_json: Slice,
        host: *const HostServicesTable,
        out_instance: *mut *mut c_void,
        out_error: *mut Buffer,
    ) -> u32,
    /// Sends one message. Thread-safe: the host calls it from many threads at once.
    pub send: unsafe extern "C" fn(
        instance: *const c_void,
        outbound: *const Outbound,
        out: *mut SendResult,
    ) -> u32,
    /// Handles one provider webhook. Events emitted with `request.call` as the call
    /// context are handed back to the host with the response.
    pub handle_webhook: unsafe extern "C" fn(
        instance: *const c_void,
        request: *const WebhookRequest,
        out: *mut WebhookResponse,
    ) -> u32,
    /// Reports health.
    pub health: unsafe extern "C" fn(instance: *const c_void, out: *mut HealthReport) -> u32,
    /// Stops the instance, joins its threads and frees it. Nothing is called after it.
    pub stop: unsafe extern "C" fn(instance: *mut c_void) -> u32,
}

/// The services the host gives a plugin instance. Valid from `start` until `stop`
/// has returned; every function is thread-safe and non-blocking except `http`.
#[repr(C)]
#[derive(Debug)]
pub struct HostServicesTable {
    /// The host's context, passed back to every function.
    pub ctx: *const c_void,
    /// Hands an event to the host; returns an [`emit`] value and never blocks.
    /// `call` is null outside a webhook call, or the `call` of the
    /// [`WebhookRequest`] being handled: such events are returned with the
    /// webhook's response, so the host can commit them before answering.
    pub emit:
        unsafe extern "C" fn(ctx: *const c_void, call: *const c_void, event: *const Event) -> u32,
    /// Writes a line to the daemon's log (a [`level`] value). Never PHI.
    pub log: unsafe extern "C" fn(ctx: *const c_void, level: u32, message: Slice),
    /// Performs an HTTP request with the host's client. Returns [`call::OK`] with
    /// `out` set, or [`call::ERROR`] with `out.error` set. Blocks the calling thread.
    pub http: unsafe extern "C" fn(
        ctx: *const c_void,
        request: *const HttpRequest,
        out: *mut HttpResponse,
    ) -> u32,
}

/// One message to send (host → plugin).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Outbound {
    /// The host's delivery id.
    pub delivery_id: Slice,
    /// Recipient: E.164 number or e-mail address (PHI).
    pub to: Slice,
    /// Sender; empty means "the gateway's configured sender".
    pub from: Slice,
    /// Text (PHI).
    pub body: Slice,
    /// Stable across retries of the same delivery; pass it to providers that dedupe.
    pub idempotency_key: Slice,
    /// Subject line (e-mail); absent otherwise.
    pub subject: Slice,
    /// 1 for the first attempt, then 2, 3, ...
    pub attempt: u32,
}

/// The outcome of `send` (plugin → host, written into the host's out-parameter).
#[repr(C)]
#[derive(Debug)]
pub struct SendResult {
    /// A [`send`] value.
    pub kind: u32,
    /// For [`send::RETRYABLE`]: milliseconds to wait, or [`RETRY_AFTER_NONE`].
    pub retry_after_ms: u64,
    /// For [`send::SENT`]: the provider's message id.
    pub provider_id: Buffer,
    /// For [`send::PERMANENT`] and [`send::RETRYABLE`]: the provider's error code (may be absent).
    pub code: Buffer,
    /// For every failure: a human-readable reason (no PHI).
    pub reason: Buffer,
}

/// A provider's request to `/v1/hooks/{instance}` (host → plugin).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WebhookRequest {
    /// The per-call context to pass to `emit` for events that belong to this request.
    pub call: *const c_void,
    /// HTTP method, upper case.
    pub method: Slice,
    /// The configured public URL of this hook, with the request's query string
    /// appended when it has one: exactly what providers sign.
    pub public_url: Slice,
    /// The peer's socket address (`127.0.0.1:53211`, `[::1]:53211`); absent on a Unix socket.
    pub remote_addr: Slice,
    /// Request headers as a header block (see [`crate::headers`]).
    pub headers: Slice,
    /// The raw request body.
    pub body: Slice,
}

/// The answer to a webhook (plugin → host).
#[repr(C)]
#[derive(Debug)]
pub struct WebhookResponse {
    /// HTTP status code.
    pub status: u32,
    /// Response headers as a header block (see [`crate::headers`]).
    pub headers: Buffer,
    /// Response body.
    pub body: Buffer,
}

/// Something that happened at the provider (plugin → host, borrowed for the call).
/// Which fields are set depends on `kind`; unused fields are absent.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// An [`event`] value.
    pub kind: u32,
    /// For [`event::DELIVERY_RECEIPT`]: a [`receipt`] value.
    pub receipt_status: u32,
    /// Sender of an inbound message.
    pub from: Slice,
    /// Recipient of an inbound message (one of the clinic's numbers).
    pub to: Slice,
    /// Text of an inbound message.
    pub body: Slice,
    /// The provider's id of the message (inbound message, delivery receipt).
    pub provider_message_id: Slice,
    /// The provider's error code of a failed delivery; may be absent.
    pub error_code: Slice,
    /// The number of an opt-out.
    pub number: Slice,
}

/// An HTTP request a plugin asks the host to perform (plugin → host).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest {
    /// HTTP method, upper case.
    pub method: Slice,
    /// Absolute URL.
    pub url: Slice,
    /// Request headers as a header block (see [`crate::headers`]).
    pub headers: Slice,
    /// Request body.
    pub body: Slice,
    /// Timeout in milliseconds; 0 means the host's default (which is also the ceiling).
    pub timeout_ms: u64,
}

/// The host's answer to an `http` call (host → plugin).
#[repr(C)]
#[derive(Debug)]
pub struct HttpResponse {
    /// HTTP status code (on [`call::OK`]).
    pub status: u32,
    /// Response headers as a header block (see [`crate::headers`]).
    pub headers: Buffer,
    /// Response body.
    pub body: Buffer,
    /// On [`call::ERROR`]: why the request failed.
    pub error: Buffer,
}

/// The answer to `health` (plugin → host).
#[repr(C)]
#[derive(Debug)]
pub struct HealthReport {
    /// A [`health`] value.
    pub status: u32,
    /// Why it is degraded or down; may be absent.
    pub detail: Buffer,
}

/// The size of each ABI structure as compiled here, in declaration order.
///
/// The host compares a plugin's declared sizes against these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StructSizes {
    /// [`PluginDeclaration`].
    pub declaration: u32,
    /// [`PluginVTable`].
    pub vtable: u32,
    /// [`HostServicesTable`].
    pub host_services: u32,
    /// [`Outbound`].
    pub outbound: u32,
    /// [`SendResult`].
    pub send_result: u32,
    /// [`WebhookRequest`].
    pub webhook_request: u32,
    /// [`WebhookResponse`].
    pub webhook_response: u32,
    /// [`Event`].
    pub event: u32,
    /// [`HttpRequest`].
    pub http_request: u32,
    /// [`HttpResponse`].
    pub http_response: u32,
    /// [`HealthReport`].
    pub health: u32,
}

/// Narrows a structure size to the `u32` the declaration stores. ABI structures are a
/// few hundred bytes at most, far below `u32::MAX`; the `as` cannot truncate.
const fn size32<T>() -> u32 {
    core::mem::size_of::<T>() as u32
}

impl StructSizes {
    /// The sizes of this build.
    pub const CURRENT: StructSizes = StructSizes {
        declaration: size32::<PluginDeclaration>(),
        vtable: size32::<PluginVTable>(),
        host_services: size32::<HostServicesTable>(),
        outbound: size32::<Outbound>(),
        send_result: size32::<SendResult>(),
        webhook_request: size32::<WebhookRequest>(),
        webhook_response: size32::<WebhookResponse>(),
        event: size32::<Event>(),
        http_request: size32::<HttpRequest>(),
        http_response: size32::<HttpResponse>(),
        health: size32::<HealthReport>(),
    };

    /// The sizes a declaration states.
    pub fn of(declaration: &PluginDeclaration) -> StructSizes {
        StructSizes {
            declaration: declaration.header.declaration_size,
            vtable: declaration.vtable_size,
            host_services: declaration.host_services_size,
            outbound: declaration.outbound_size,
            send_result: declaration.send_result_size,
            webhook_request: declaration.webhook_request_size,
            webhook_response: declaration.webhook_response_size,
            event: declaration.event_size,
            http_request: declaration.http_request_size,
            http_response: declaration.http_response_size,
            health: declaration.health_size,
        }
    }

    /// `(structure name, size)` pairs, for messages and comparisons.
    pub fn named(&self) -> [(&'static str, u32); 11] {
        [
            ("PluginDeclaration", self.declaration),
            ("PluginVTable", self.vtable),
            ("HostServicesTable", self.host_services),
            ("Outbound", self.outbound),
            ("SendResult", self.send_result),
            ("WebhookRequest", self.webhook_request),
            ("WebhookResponse", self.webhook_response),
            ("Event", self.event),
            ("HttpRequest", self.http_request),
            ("HttpResponse", self.http_response),
            ("HealthReport", self.health),
        ]
    }
}

/// Builds a declaration; used by [`crate::export_plugin!`].
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub const fn declaration(
    name: &'static str,
    version: &'static str,
    kind: u32,
    abi_major: u32,
    flags: u32,
    vtable: &'static PluginVTable,
) -> PluginDeclaration {
    let sizes = StructSizes::CURRENT;
    PluginDeclaration {
        header: DeclarationHeader {
            magic: MAGIC,
            abi_major,
            abi_minor: ABI_MINOR,
            declaration_size: sizes.declaration,
            flags,
        },
        kind,
        vtable_size: sizes.vtable,
        host_services_size: sizes.host_services,
        outbound_size: sizes.outbound,
        send_result_size: sizes.send_result,
        webhook_request_size: sizes.webhook_request,
        webhook_response_size: sizes.webhook_response,
        event_size: sizes.event,
        http_request_size: sizes.http_request,
        http_response_size: sizes.http_response,
        health_size: sizes.health,
        name: Slice::from_static(name),
        version: Slice::from_static(version),
        sdk_version: Slice::from_static(env!("CARGO_PKG_VERSION")),
        vtable: vtable as *const PluginVTable,
    }
}

impl Slice {
    /// An absent value.
    pub const NONE: Slice = Slice {
        ptr: core::ptr::null(),
        len: 0,
    };

    /// Borrows `bytes` (the caller keeps them alive for the call).
    pub const fn from_bytes(bytes: &[u8]) -> Slice {
        Slice {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// Borrows a `'static` string (for the declaration).
    pub const fn from_static(text: &'static str) -> Slice {
        Slice::from_bytes(text.as_bytes())
    }

    /// Borrows a string.
    pub const fn from_text(text: &str) -> Slice {
        Slice::from_bytes(text.as_bytes())
    }

    /// Borrows an optional string; `None` becomes absent.
    pub fn from_opt_text(text: Option<&str>) -> Slice {
        text.map_or(Slice::NONE, Slice::from_text)
    }

    /// Whether the value is absent.
    pub fn is_none(&self) -> bool {
        self.ptr.is_null()
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn header_is_frozen_at_24_bytes() {
        assert_eq!(core::mem::size_of::<DeclarationHeader>(), 24);
        assert_eq!(core::mem::offset_of!(PluginDeclaration, header), 0);
    }

    #[test]
    fn magic_spells_caremsg() {
        assert_eq!(&MAGIC.to_le_bytes(), b"CAREMSG\0");
    }

    #[test]
    fn named_sizes_cover_every_structure() {
        let named = StructSizes::CURRENT.named();
        assert!(named.iter().all(|(_, size)| *size > 0));
        assert_eq!(named[0].1, StructSizes::CURRENT.declaration);
    }
}
