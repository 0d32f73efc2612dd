//! The libvirt C functions this module calls, resolved at run time.
//!
//! Nothing here is linked at load time: `libvirt.so.0` is opened with
//! [`libloading`] on the first call of [`api`], and `libvirt-qemu.so.0` on the
//! first call of [`qemu_api`]. Each table of function pointers is resolved once
//! and kept, with its [`Library`], in a `static` [`OnceLock`], so the library is
//! never unloaded and the pointers stay valid for the rest of the process. A
//! failed load is kept the same way: every later call gets the same
//! [`Error::Unavailable`] without trying `dlopen` again.
//!
//! Signatures follow libvirt's headers (`libvirt-host.h`, `libvirt-domain.h`,
//! `libvirt-qemu.h`, `virterror.h`) as bindgen renders them in virt-sys 0.3's
//! `bindgen/bindings.rs`; the numeric constants are taken from the same files.

use std::ffi::{OsString, c_char, c_int, c_uint, c_ulong, c_void};
use std::sync::OnceLock;

use libloading::Library;

use super::{Error, LIBRARY_ENV, QEMU_LIBRARY_ENV};

const DEFAULT_LIBRARY: &str = "libvirt.so.0";
const DEFAULT_QEMU_LIBRARY: &str = "libvirt-qemu.so.0";

const INSTALL_HINT: &str = "install libvirt0 (Debian, Ubuntu) or libvirt-libs (Fedora, RHEL)";
const QEMU_INSTALL_HINT: &str = "install libvirt0 (Debian, Ubuntu) or libvirt-libs (Fedora, RHEL), \
     the same packages that carry libvirt.so.0";

/// `struct _virConnect`, opaque.
#[repr(C)]
pub(super) struct VirConnect {
    _opaque: [u8; 0],
}

/// `struct _virDomain`, opaque.
#[repr(C)]
pub(super) struct VirDomain {
    _opaque: [u8; 0],
}

/// `virConnectPtr`.
pub(super) type VirConnectPtr = *mut VirConnect;
/// `virDomainPtr`.
pub(super) type VirDomainPtr = *mut VirDomain;

/// `virError` from `virterror.h`. Only `code`, `domain` and `message` are
/// read; the rest is declared so the layout matches.
#[repr(C)]
pub(super) struct VirError {
    /// `virErrorNumber`.
    pub(super) code: c_int,
    /// `virErrorDomain`.
    pub(super) domain: c_int,
    /// Human-readable message, owned by libvirt.
    pub(super) message: *mut c_char,
    level: c_int,
    conn: VirConnectPtr,
    dom: VirDomainPtr,
    str1: *mut c_char,
    str2: *mut c_char,
    str3: *mut c_char,
    int1: c_int,
    int2: c_int,
    net: *mut c_void,
}

/// `virErrorFunc`.
pub(super) type VirErrorFunc =
    Option<unsafe extern "C" fn(user_data: *mut c_void, error: *mut VirError)>;

/// `VIR_UUID_STRING_BUFLEN`: 36 characters and the NUL.
pub(super) const VIR_UUID_STRING_BUFLEN: usize = 37;
/// `VIR_DOMAIN_XML_INACTIVE` (`virDomainXMLFlags`).
pub(super) const VIR_DOMAIN_XML_INACTIVE: c_uint = 2;
/// `VIR_DOMAIN_START_AUTODESTROY`: destroy the domain when its connection closes.
pub(super) const VIR_DOMAIN_START_AUTODESTROY: c_uint = 2;
/// `VIR_DOMAIN_AFFECT_CURRENT` (`virDomainModificationImpact`).
pub(super) const VIR_DOMAIN_AFFECT_CURRENT: c_uint = 0;
/// `VIR_DOMAIN_AFFECT_LIVE`.
pub(super) const VIR_DOMAIN_AFFECT_LIVE: c_uint = 1;
/// `VIR_DOMAIN_AFFECT_CONFIG`.
pub(super) const VIR_DOMAIN_AFFECT_CONFIG: c_uint = 2;
/// `VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT` (QMP).
pub(super) const VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT: c_uint = 0;
/// `VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP`.
pub(super) const VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP: c_uint = 1;

/// Declares a struct of function pointers and the loader that fills it, one
/// `dlsym` per field, the symbol named after the field.
macro_rules! function_table {
    (
        $(#[$meta:meta])*
        struct $table:ident {
            $( $(#[$fmeta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?; )*
        }
    ) => {
        $(#[$meta])*
        #[allow(non_snake_case)]
        pub(super) struct $table {
            $( $(#[$fmeta])* pub(super) $name: unsafe extern "C" fn($($arg: $ty),*) $(-> $ret)?, )*
        }

        impl $table {
            /// Resolves every function of the table in `library`.
            ///
            /// # Safety
            ///
            /// `library` must be the library whose C declarations the field
            /// types transcribe, and must stay loaded for as long as the
            /// returned table is used.
            unsafe fn resolve(library: &Library) -> Result<Self, (&'static str, libloading::Error)> {
                Ok(Self {
                    $(
                        $name: {
                            const SYMBOL: &str = concat!(stringify!($name), "\0");
                            // SAFETY: the field type transcribes the C prototype of
                            // this symbol (see the module doc); the caller keeps
                            // `library` loaded while the pointer is used.
                            let symbol = unsafe {
                                library.get::<unsafe extern "C" fn($($ty),*) $(-> $ret)?>(SYMBOL.as_bytes())
                            }
                            .map_err(|error| (stringify!($name), error))?;
                            *symbol
                        },
                    )*
                })
            }
        }
    };
}

function_table! {
    /// The functions of `libvirt.so.0` this module uses.
    struct Api {
        fn virInitialize() -> c_int;
        fn virGetVersion(lib_ver: *mut c_ulong, type_: *const c_char, type_ver: *mut c_ulong) -> c_int;
        fn virSetErrorFunc(user_data: *mut c_void, handler: VirErrorFunc);
        fn virGetLastError() -> *mut VirError;
        fn virResetLastError();

        fn virConnectOpen(name: *const c_char) -> VirConnectPtr;
        fn virConnectClose(conn: VirConnectPtr) -> c_int;
        fn virConnectGetType(conn: VirConnectPtr) -> *const c_char;
        fn virConnectGetVersion(conn: VirConnectPtr, hv_ver: *mut c_ulong) -> c_int;
        fn virConnectGetLibVersion(conn: VirConnectPtr, lib_ver: *mut c_ulong) -> c_int;
        fn virConnectGetCapabilities(conn: VirConnectPtr) -> *mut c_char;
        fn virConnectGetURI(conn: VirConnectPtr) -> *mut c_char;
        fn virConnectListAllDomains(conn: VirConnectPtr, domains: *mut *mut VirDomainPtr, flags: c_uint) -> c_int;

        fn virDomainDefineXML(conn: VirConnectPtr, xml: *const c_char) -> VirDomainPtr;
        fn virDomainCreateXML(conn: VirConnectPtr, xml_desc: *const c_char, flags: c_uint) -> VirDomainPtr;
        fn virDomainLookupByName(conn: VirConnectPtr, name: *const c_char) -> VirDomainPtr;
        fn virDomainFree(domain: VirDomainPtr) -> c_int;
        fn virDomainGetName(domain: VirDomainPtr) -> *const c_char;
        fn virDomainGetUUIDString(domain: VirDomainPtr, buf: *mut c_char) -> c_int;
        fn virDomainGetXMLDesc(domain: VirDomainPtr, flags: c_uint) -> *mut c_char;
        fn virDomainCreate(domain: VirDomainPtr) -> c_int;
        fn virDomainShutdown(domain: VirDomainPtr) -> c_int;
        fn virDomainDestroy(domain: VirDomainPtr) -> c_int;
        fn virDomainUndefine(domain: VirDomainPtr) -> c_int;
        fn virDomainGetState(domain: VirDomainPtr, state: *mut c_int, reason: *mut c_int, flags: c_uint) -> c_int;
        fn virDomainAttachDeviceFlags(domain: VirDomainPtr, xml: *const c_char, flags: c_uint) -> c_int;
        fn virDomainDetachDeviceFlags(domain: VirDomainPtr, xml: *const c_char, flags: c_uint) -> c_int;
        fn virDomainIsPersistent(dom: VirDomainPtr) -> c_int;
    }
}

function_table! {
    /// The functions of `libvirt-qemu.so.0` this module uses.
    struct QemuApi {
        fn virDomainQemuMonitorCommand(domain: VirDomainPtr, cmd: *const c_char, result: *mut *mut c_char, flags: c_uint) -> c_int;
    }
}

/// A resolved table with the library it came from, which is never dropped.
struct Loaded<T> {
    functions: T,
    _library: Library,
}

static LIBVIRT: OnceLock<Result<Loaded<Api>, Error>> = OnceLock::new();
static LIBVIRT_QEMU: OnceLock<Result<Loaded<QemuApi>, Error>> = OnceLock::new();

/// The functions of `libvirt.so.0`, loading it on the first call.
///
/// The first call also sets a no-op libvirt error handler, so libvirt does not
/// print every error to stderr, and runs `virInitialize`.
pub(super) fn api() -> Result<&'static Api, Error> {
    match LIBVIRT.get_or_init(load_libvirt) {
        Ok(loaded) => Ok(&loaded.functions),
        Err(error) => Err(error.clone()),
    }
}

/// The functions of `libvirt-qemu.so.0`, loading it on the first call.
pub(super) fn qemu_api() -> Result<&'static QemuApi, Error> {
    match LIBVIRT_QEMU.get_or_init(load_libvirt_qemu) {
        Ok(loaded) => Ok(&loaded.functions),
        Err(error) => Err(error.clone()),
    }
}

/// The library to open: the environment variable's value when set and not
/// empty, the default soname otherwise.
fn library_name(env: &str, default: &str) -> OsString {
    match std::env::var_os(env) {
        Some(name) if !name.is_empty() => name,
        _ => OsString::from(default),
    }
}

/// `libloading`'s error with the `dlerror` text it wraps.
fn describe(error: &libloading::Error) -> String {
    match std::error::Error::source(error) {
        Some(source) => source.to_string(),
        None => error.to_string(),
    }
}

/// Opens `name` and resolves `T` in it.
///
/// # Safety
///
/// `resolve` must be the table's `resolve`, whose field types must match the
/// library named `name`.
unsafe fn load<T>(
    what: &str,
    name: &OsString,
    hint: &str,
    resolve: unsafe fn(&Library) -> Result<T, (&'static str, libloading::Error)>,
) -> Result<Loaded<T>, Error> {
    let shown = name.to_string_lossy();
    // SAFETY: libvirt's initialisers (glib, gnutls, libxml2 set-up) are safe to
    // run at any time in a process; the library is never unloaded afterwards
    // (the `Loaded` goes into a `static`), so its finalisers never run early.
    let library = unsafe { Library::new(name) }.map_err(|error| {
        // dlerror's text names the file in the usual cases; name it once.
        let detail = describe(&error);
        if detail.contains(shown.as_ref()) {
            Error::Unavailable(format!("cannot load {what}: {detail}; {hint}"))
        } else {
            Error::Unavailable(format!("cannot load {what}: {shown}: {detail}; {hint}"))
        }
    })?;
    // SAFETY: per this function's contract `resolve` matches the library, and
    // `library` is returned alongside the table, so it outlives every use.
    let functions = unsafe { resolve(&library) }.map_err(|(symbol, error)| {
        Error::Unavailable(format!(
            "{shown} lacks {symbol} ({}): libvirt is too old or not libvirt; {hint}",
            describe(&error)
        ))
    })?;
    Ok(Loaded {
        functions,
        _library: library,
    })
}

/// The error handler set with `virSetErrorFunc`: drops the error, which stays
/// readable with `virGetLastError` on the failing thread.
unsafe extern "C" fn discard_error(_user_data: *mut c_void, _error: *mut VirError) {}

fn load_libvirt() -> Result<Loaded<Api>, Error> {
    let name = library_name(LIBRARY_ENV, DEFAULT_LIBRARY);
    // SAFETY: `Api::resolve` transcribes libvirt.so.0's prototypes.
    let loaded = unsafe { load("libvirt", &name, INSTALL_HINT, Api::resolve) };
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            tracing::debug!(%error, "libvirt unavailable");
            return Err(error);
        }
    };
    let api = &loaded.functions;
    // SAFETY: virSetErrorFunc only stores the handler and its (null, unused)
    // user data in globals; `discard_error` never touches its arguments and,
    // being a plain function, lives as long as the process.
    unsafe { (api.virSetErrorFunc)(std::ptr::null_mut(), Some(discard_error)) };
    // SAFETY: virInitialize takes no arguments and is idempotent. It sets up the
    // thread-local error slot that virResetLastError and virGetLastError use:
    // before it that slot's pthread key is uninitialised.
    if unsafe { (api.virInitialize)() } < 0 {
        let error = Error::Unavailable(format!("{}: virInitialize failed", name.to_string_lossy()));
        tracing::debug!(%error, "libvirt unavailable");
        return Err(error);
    }
    tracing::debug!(library = %name.to_string_lossy(), "loaded libvirt");
    Ok(loaded)
}

fn load_libvirt_qemu() -> Result<Loaded<QemuApi>, Error> {
    // libvirt-qemu.so.0 needs libvirt.so.0 loaded and initialised first.
    api()?;
    let name = library_name(QEMU_LIBRARY_ENV, DEFAULT_QEMU_LIBRARY);
    // SAFETY: `QemuApi::resolve` transcribes libvirt-qemu.so.0's prototype.
    let loaded = unsafe { load("libvirt-qemu", &name, QEMU_INSTALL_HINT, QemuApi::resolve) };
    match &loaded {
        Ok(_) => tracing::debug!(library = %name.to_string_lossy(), "loaded libvirt-qemu"),
        Err(error) => tracing::debug!(%error, "libvirt-qemu unavailable"),
    }
    loaded
}
