//! Process-wide SQLite settings, made once by the `caremsgd` binary before anything
//! opens a database (`sqlite3_config` is refused once SQLite has initialised, and it
//! must not run while another thread calls SQLite). Each is a cost measured on the
//! writer's thread, which is what limits the SQLite daemon's writes (`bench clinic`:
//! the writer busy 96% of the mix):
//!
//! - **SQLite allocates with mimalloc**, the daemon's allocator, not glibc's malloc
//!   (`_int_malloc`, `unlink_chunk` and `malloc` were 6% of the writer's thread). It
//!   costs about 50 MB more peak resident memory (SQLite's 4.3 KiB page buffers fall in
//!   mimalloc's 5 KiB size class) for about 6% of the daemon's CPU per request.
//! - **A commit does not scan the whole page cache for nothing.** At the end of every
//!   write transaction SQLite drops the cached pages past the database's end
//!   (`pager_end_transaction` → `xTruncate`). Its cache (`pcache1`) keeps the largest
//!   page number it has ever held and, when that is far past the end, scans every
//!   slot of its hash table. A b-tree split that puts its new pages in order parks one
//!   page for a moment under the number of the 1 GiB lock-byte page, which is never a
//!   real page (`balance_nonroot`: `pgnoTemp`); so, in any database under 1 GiB, a
//!   commit after an insert that split a page walked the writer's whole cache (8,192
//!   slots and every page in them at 32 MiB): 5.3% of the writer's thread in the
//!   clinic mix. [`Keys`] wraps SQLite's own cache and skips a truncation when no page
//!   it holds can be at or past the limit, not counting that parked number.
//!
//! Library users (the tests, which start daemons in-process) keep SQLite's defaults:
//! [`install`] is `unsafe` because nothing can check its precondition once other
//! threads may use SQLite. The tests that run the binary (`daemon/tests/faults.rs`:
//! SIGKILL under load, a full disk) and `daemon/tests/sqlite_tuning.rs` (a process of
//! its own) run with both settings.

// FFI to SQLite's C configuration interface: every `unsafe` block says why it holds.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use libsqlite3_sys as ffi;

/// Why [`install`] left SQLite's defaults: the `sqlite3_config` call that failed and
/// SQLite's result code (`SQLITE_MISUSE`: SQLite was already initialised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The setting.
    pub setting: &'static str,
    /// SQLite's result code.
    pub code: c_int,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SQLite refused {} (code {})", self.setting, self.code)
    }
}

/// Makes the settings above, once per process; later calls return the first
/// outcome. Each setting is independent: one refused leaves the others made.
///
/// # Safety
/// No other thread may call SQLite while the first call runs (`sqlite3_config` is not
/// thread-safe): call it before anything in the process can use SQLite.
pub unsafe fn install() -> Result<(), Refused> {
    // SAFETY: the caller's promise is `configure`'s.
    *INSTALLED.get_or_init(|| unsafe { configure() })
}

/// [`install`]'s outcome, once it ran.
static INSTALLED: OnceLock<Result<(), Refused>> = OnceLock::new();

/// Which SQLite this process runs, in a benchmark's words: the settings and the
/// commits' truncations they skipped, or the setting SQLite refused (the others may
/// have been made), or that none was installed.
pub fn describe() -> String {
    match INSTALLED.get() {
        Some(Ok(())) => {
            let (skipped, passed) = truncations();
            format!(
                "mimalloc and the page-cache wrapper ({skipped} truncations skipped, {passed} run)"
            )
        }
        Some(Err(refused)) => format!("a default: {refused}"),
        None => "its defaults (the settings were not installed)".to_owned(),
    }
}

/// Page cache truncations at a commit: (skipped: nothing could be past the limit,
/// passed to SQLite's cache), since the process started.
pub fn truncations() -> (u64, u64) {
    (
        SKIPPED.load(Ordering::Relaxed),
        PASSED.load(Ordering::Relaxed),
    )
}

static SKIPPED: AtomicU64 = AtomicU64::new(0);
static PASSED: AtomicU64 = AtomicU64::new(0);

/// # Safety
/// No other thread may call SQLite while this runs.
unsafe fn configure() -> Result<(), Refused> {
    // SAFETY (here and in `wrap_page_cache`): each `sqlite3_config` call passes the
    // argument type its option documents; SQLite copies both method tables, and the
    // functions they point to live for the whole process.
    let mimalloc = ffi::sqlite3_mem_methods {
        xMalloc: Some(mem_malloc),
        xFree: Some(mem_free),
        xRealloc: Some(mem_realloc),
        xSize: Some(mem_size),
        xRoundup: Some(mem_roundup),
        xInit: Some(mem_init),
        xShutdown: Some(mem_shutdown),
        pAppData: std::ptr::null_mut(),
    };
    let malloc = answered("SQLITE_CONFIG_MALLOC", unsafe {
        ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &raw const mimalloc)
    });
    let pcache = unsafe { wrap_page_cache() };
    malloc.and(pcache)
}

/// `Ok` when SQLite answered `SQLITE_OK` to `setting`.
fn answered(setting: &'static str, code: c_int) -> Result<(), Refused> {
    if code == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(Refused { setting, code })
    }
}

/// A byte count from SQLite (never negative; SQLite asks for at most 2^31 - 256).
fn bytes(n: c_int) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// A byte count for SQLite (which keeps them in an `int`).
fn int(n: usize) -> c_int {
    c_int::try_from(n).unwrap_or(c_int::MAX)
}

// SQLite's allocator: mimalloc, which returns blocks aligned to at least 16 bytes
// (SQLite needs 8) and knows each block's size (`xSize`), so no header is added.

unsafe extern "C" fn mem_malloc(n: c_int) -> *mut c_void {
    // SAFETY: mimalloc's malloc takes any size.
    unsafe { libmimalloc_sys::mi_malloc(bytes(n)) }
}

unsafe extern "C" fn mem_free(p: *mut c_void) {
    // SAFETY: SQLite frees only what `mem_malloc`/`mem_realloc` returned.
    unsafe { libmimalloc_sys::mi_free(p) }
}

unsafe extern "C" fn mem_realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    // SAFETY: as `mem_free`; mimalloc keeps the contents up to the smaller size.
    unsafe { libmimalloc_sys::mi_realloc(p, bytes(n)) }
}

unsafe extern "C" fn mem_size(p: *mut c_void) -> c_int {
    // SAFETY: as `mem_free` (null gives 0).
    int(unsafe { libmimalloc_sys::mi_usable_size(p) })
}

unsafe extern "C" fn mem_roundup(n: c_int) -> c_int {
    // SAFETY: a pure function of the size.
    int(unsafe { libmimalloc_sys::mi_good_size(bytes(n)) })
}

unsafe extern "C" fn mem_init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn mem_shutdown(_: *mut c_void) {}

/// The page number SQLite parks a page under while it swaps two pages' numbers:
/// the page holding the lock byte at 1 GiB, which never holds data.
fn lock_page(page_size: c_int) -> c_uint {
    const PENDING_BYTE: c_uint = 0x4000_0000;
    PENDING_BYTE / c_uint::try_from(page_size.max(1)).unwrap_or(1) + 1
}

/// What one page cache has held, by page number, for deciding whether a
/// truncation can drop anything.
#[derive(Debug, Clone, Copy)]
struct Keys {
    lock_page: c_uint,
    // At least the largest number of any page in the cache, except a page parked
    // under `lock_page`.
    max: c_uint,
}

impl Keys {
    fn new(page_size: c_int) -> Self {
        Self {
            lock_page: lock_page(page_size),
            max: 0,
        }
    }

    /// A page is in the cache under `key` (fetched, or moved there by a rekey). A
    /// page parked under the lock page is not counted: SQLite moves it on before it
    /// does anything else with the cache.
    fn holds(&mut self, key: c_uint) {
        if key != self.lock_page {
            self.max = self.max.max(key);
        }
    }

    /// SQLite drops the pages numbered `limit` and above: whether any can be in the
    /// cache (then the truncation runs, and after it none is past `limit - 1`).
    fn truncate(&mut self, limit: c_uint) -> bool {
        if limit > self.max {
            return false;
        }
        self.max = limit.saturating_sub(1);
        true
    }
}

type Pcache = ffi::sqlite3_pcache;
type Page = ffi::sqlite3_pcache_page;

/// SQLite's own page cache, whose methods the wrapper calls: every one present
/// ([`Methods::of`] is `None` otherwise, and the wrapper is not installed).
struct Methods {
    arg: *mut c_void,
    init: unsafe extern "C" fn(*mut c_void) -> c_int,
    shutdown: unsafe extern "C" fn(*mut c_void),
    create: unsafe extern "C" fn(c_int, c_int, c_int) -> *mut Pcache,
    cachesize: unsafe extern "C" fn(*mut Pcache, c_int),
    pagecount: unsafe extern "C" fn(*mut Pcache) -> c_int,
    fetch: unsafe extern "C" fn(*mut Pcache, c_uint, c_int) -> *mut Page,
    unpin: unsafe extern "C" fn(*mut Pcache, *mut Page, c_int),
    rekey: unsafe extern "C" fn(*mut Pcache, *mut Page, c_uint, c_uint),
    truncate: unsafe extern "C" fn(*mut Pcache, c_uint),
    destroy: unsafe extern "C" fn(*mut Pcache),
    shrink: unsafe extern "C" fn(*mut Pcache),
}

impl Methods {
    fn of(table: &ffi::sqlite3_pcache_methods2) -> Option<Self> {
        Some(Self {
            arg: table.pArg,
            init: table.xInit?,
            shutdown: table.xShutdown?,
            create: table.xCreate?,
            cachesize: table.xCachesize?,
            pagecount: table.xPagecount?,
            fetch: table.xFetch?,
            unpin: table.xUnpin?,
            rekey: table.xRekey?,
            truncate: table.xTruncate?,
            destroy: table.xDestroy?,
            shrink: table.xShrink?,
        })
    }
}

// SAFETY: function pointers, and SQLite's `pArg`, which SQLite's own cache uses from
// any connection's thread.
unsafe impl Send for Methods {}
unsafe impl Sync for Methods {}

/// SQLite's cache's methods, saved before the wrapper is installed, which is the only
/// way SQLite can call the `pc_` functions below.
static DEFAULT: OnceLock<Methods> = OnceLock::new();

/// One cache: SQLite's, the methods that serve it, and its [`Keys`]. SQLite calls a
/// cache's methods from the connection that owns it, one call at a time.
struct Cache {
    inner: *mut Pcache,
    methods: &'static Methods,
    keys: Keys,
}

/// # Safety
/// As [`configure`].
unsafe fn wrap_page_cache() -> Result<(), Refused> {
    // SAFETY: GETPCACHE2 fills a `sqlite3_pcache_methods2` (installing SQLite's
    // default cache first if none is set).
    let mut table: ffi::sqlite3_pcache_methods2 = unsafe { std::mem::zeroed() };
    answered("SQLITE_CONFIG_GETPCACHE2", unsafe {
        ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, &raw mut table)
    })?;
    let saved = Methods::of(&table).is_some_and(|methods| DEFAULT.set(methods).is_ok());
    if !saved {
        return answered("SQLITE_CONFIG_PCACHE2", ffi::SQLITE_MISUSE);
    }
    let wrapper = ffi::sqlite3_pcache_methods2 {
        iVersion: 2,
        pArg: std::ptr::null_mut(),
        xInit: Some(pc_init),
        xShutdown: Some(pc_shutdown),
        xCreate: Some(pc_create),
        xCachesize: Some(pc_cachesize),
        xPagecount: Some(pc_pagecount),
        xFetch: Some(pc_fetch),
        xUnpin: Some(pc_unpin),
        xRekey: Some(pc_rekey),
        xTruncate: Some(pc_truncate),
        xDestroy: Some(pc_destroy),
        xShrink: Some(pc_shrink),
    };
    // SAFETY: PCACHE2 takes a `sqlite3_pcache_methods2` and copies it.
    answered("SQLITE_CONFIG_PCACHE2", unsafe {
        ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &raw const wrapper)
    })
}

/// A wrapped cache: `p` is what [`pc_create`] returned.
unsafe fn cache<'a>(p: *mut Pcache) -> &'a mut Cache {
    // SAFETY: `p` came from `Box::into_raw` in `pc_create` and is not yet destroyed;
    // SQLite calls one cache's methods one at a time.
    unsafe { &mut *p.cast::<Cache>() }
}

// The wrapper's methods: each calls SQLite's with the wrapped cache; none may panic
// (they are called from C).
// SAFETY (every call below): the arguments are SQLite's own, passed through, with the
// cache pointer SQLite's cache gave `pc_create`.

unsafe extern "C" fn pc_init(_: *mut c_void) -> c_int {
    DEFAULT
        .get()
        .map_or(ffi::SQLITE_MISUSE, |d| unsafe { (d.init)(d.arg) })
}

unsafe extern "C" fn pc_shutdown(_: *mut c_void) {
    if let Some(d) = DEFAULT.get() {
        unsafe { (d.shutdown)(d.arg) }
    }
}

unsafe extern "C" fn pc_create(page_size: c_int, extra: c_int, purgeable: c_int) -> *mut Pcache {
    let Some(methods) = DEFAULT.get() else {
        return std::ptr::null_mut();
    };
    let inner = unsafe { (methods.create)(page_size, extra, purgeable) };
    if inner.is_null() {
        return inner;
    }
    Box::into_raw(Box::new(Cache {
        inner,
        methods,
        keys: Keys::new(page_size),
    }))
    .cast()
}

unsafe extern "C" fn pc_cachesize(p: *mut Pcache, pages: c_int) {
    let cache = unsafe { cache(p) };
    unsafe { (cache.methods.cachesize)(cache.inner, pages) }
}

unsafe extern "C" fn pc_pagecount(p: *mut Pcache) -> c_int {
    let cache = unsafe { cache(p) };
    unsafe { (cache.methods.pagecount)(cache.inner) }
}

unsafe extern "C" fn pc_fetch(p: *mut Pcache, key: c_uint, create: c_int) -> *mut Page {
    let cache = unsafe { cache(p) };
    let page = unsafe { (cache.methods.fetch)(cache.inner, key, create) };
    if !page.is_null() {
        cache.keys.holds(key);
    }
    page
}

unsafe extern "C" fn pc_unpin(p: *mut Pcache, page: *mut Page, discard: c_int) {
    let cache = unsafe { cache(p) };
    unsafe { (cache.methods.unpin)(cache.inner, page, discard) }
}

unsafe extern "C" fn pc_rekey(p: *mut Pcache, page: *mut Page, old: c_uint, new: c_uint) {
    let cache = unsafe { cache(p) };
    unsafe { (cache.methods.rekey)(cache.inner, page, old, new) }
    cache.keys.holds(new);
}

unsafe extern "C" fn pc_truncate(p: *mut Pcache, limit: c_uint) {
    let cache = unsafe { cache(p) };
    if !cache.keys.truncate(limit) {
        SKIPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    PASSED.fetch_add(1, Ordering::Relaxed);
    unsafe { (cache.methods.truncate)(cache.inner, limit) }
}

unsafe extern "C" fn pc_destroy(p: *mut Pcache) {
    // SAFETY: SQLite destroys a cache once, and calls none of its methods after.
    let cache = unsafe { Box::from_raw(p.cast::<Cache>()) };
    unsafe { (cache.methods.destroy)(cache.inner) }
}

unsafe extern "C" fn pc_shrink(p: *mut Pcache) {
    let cache = unsafe { cache(p) };
    unsafe { (cache.methods.shrink)(cache.inner) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parked_page_is_the_lock_byte_page() {
        assert_eq!(lock_page(4096), 262_145);
        assert_eq!(lock_page(65_536), 16_385);
    }

    #[test]
    fn a_truncation_runs_only_when_a_page_can_be_past_the_limit() {
        let mut keys = Keys::new(4096);
        for key in [1, 7, 3] {
            keys.holds(key);
        }
        // A commit: the database has 7 pages; nothing is past them.
        assert!(!keys.truncate(8));
        // A rollback to 5 pages drops 6 and 7; after it nothing is past 4.
        assert!(keys.truncate(6));
        assert!(!keys.truncate(6));
        keys.holds(9);
        assert!(keys.truncate(9));
    }

    #[test]
    fn a_page_parked_under_the_lock_page_does_not_count_but_its_next_number_does() {
        let mut keys = Keys::new(4096);
        keys.holds(10);
        // balance_nonroot swaps pages 12 and 11 through the lock page.
        keys.holds(lock_page(4096));
        keys.holds(11);
        keys.holds(12);
        assert!(!keys.truncate(13));
        assert!(keys.truncate(12));
    }
}
