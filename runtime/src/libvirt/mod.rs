//! A small, safe binding of libvirt, loaded at run time.
//!
//! The runtime copies itself to every level of a nested chain and must start
//! where libvirt is not installed, so it does not link libvirt: `libvirt.so.0`
//! is opened with `dlopen` the first time anything here needs it (the first
//! [`Connection::open`] or [`library_version`]), and `libvirt-qemu.so.0` the
//! first time [`Domain::qemu_monitor_command`] runs. If a library cannot be
//! loaded every call returns the same [`Error::Unavailable`], which names the
//! library, the `dlopen` error and the package to install; the load is not
//! retried.
//!
//! Set [`LIBRARY_ENV`] (`MATRYOSHKA_LIBVIRT_LIBRARY`) to a soname or a path to
//! load another libvirt than `libvirt.so.0`, and [`QEMU_LIBRARY_ENV`]
//! (`MATRYOSHKA_LIBVIRT_QEMU_LIBRARY`) likewise for `libvirt-qemu.so.0`. Each is
//! read once, at that library's first use; tests use a name that does not exist
//! to see the "not installed" path.
//!
//! Every call blocks (some, like starting a domain, for seconds); async callers
//! run them on a blocking thread. [`Connection`] and [`Domain`] are `Send` and
//! `Sync`: libvirt's objects are thread-safe, and libvirt's last error, which is
//! per thread, is read by each method on its own thread right after the call
//! that failed. Loading installs a no-op libvirt error handler, so libvirt does
//! not print errors to stderr: they come back as [`Error::Libvirt`] only.
//!
//! A [`Domain`] holds its own reference to its connection inside libvirt, so it
//! stays usable after the [`Connection`] it came from is dropped.

mod codes;
pub mod daemon;
mod domain;
mod ffi;

pub use domain::Domain;

use codes::code_name;

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_ulong};
use std::fmt;
use std::ptr::{self, NonNull};

/// Environment variable naming the libvirt library to load instead of
/// `libvirt.so.0`: a soname, searched the way `dlopen` searches, or a path.
/// Read once, when libvirt is first needed; an empty value means the default.
pub const LIBRARY_ENV: &str = "MATRYOSHKA_LIBVIRT_LIBRARY";

/// Environment variable naming the library to load instead of
/// `libvirt-qemu.so.0` for [`Domain::qemu_monitor_command`]. Read once, at its
/// first call; an empty value means the default.
pub const QEMU_LIBRARY_ENV: &str = "MATRYOSHKA_LIBVIRT_QEMU_LIBRARY";

/// What went wrong in a libvirt call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The library could not be loaded (or lacks a function this module
    /// needs). The message names the library, the `dlopen` error and the
    /// package to install: `libvirt0` on Debian and Ubuntu, `libvirt-libs` on
    /// Fedora and RHEL; both also carry `libvirt-qemu.so.0`.
    #[error("{0}")]
    Unavailable(String),
    /// A libvirt call failed.
    #[error("{call} failed: {message} ({})", describe_code(*.code, *.domain))]
    Libvirt {
        /// The C function that failed, e.g. `virDomainLookupByName`.
        call: &'static str,
        /// libvirt's `virErrorNumber` (`VIR_ERR_*`); see [`Error::code_name`].
        /// 0 if the call failed without recording an error.
        code: i32,
        /// libvirt's `virErrorDomain` (`VIR_FROM_*`): the part of libvirt that
        /// raised the error.
        domain: i32,
        /// libvirt's message.
        message: String,
    },
    /// An argument libvirt cannot take: a string with a NUL byte in it.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// The name of a [`Error::Libvirt`] error's code: libvirt's `VIR_ERR_*`
    /// constant without the prefix, lower case, `_` turned into `-`
    /// (`VIR_ERR_NO_DOMAIN` is `"no-domain"`, `VIR_ERR_XML_ERROR` is
    /// `"xml-error"`). `None` for the other variants and for codes this
    /// module does not know (above 114, `VIR_ERR_INVALID_ENCR_KEY_SECRET`, the
    /// last in virt-sys 0.3's bindings).
    pub fn code_name(&self) -> Option<&'static str> {
        match self {
            Error::Libvirt { code, .. } => code_name(*code),
            Error::Unavailable(_) | Error::InvalidArgument(_) => None,
        }
    }
}

/// `code` and its name, for [`Error`]'s message.
fn describe_code(code: i32, domain: i32) -> String {
    match code_name(code) {
        Some(name) => format!("libvirt error {code} {name}, domain {domain}"),
        None => format!("libvirt error {code}, domain {domain}"),
    }
}

/// The kind of hypervisor behind a [`Connection`] and its versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hypervisor {
    /// The driver's name (`virConnectGetType`), e.g. `"QEMU"`.
    pub driver: String,
    /// The hypervisor's version (`virConnectGetVersion`):
    /// `major * 1_000_000 + minor * 1_000 + release`; 0 when the driver does
    /// not know it.
    pub version: u64,
    /// The version of libvirt serving the connection
    /// (`virConnectGetLibVersion`): the daemon's for a remote URI, encoded
    /// like `version`.
    pub lib_version: u64,
}

/// Where a device change applies, for [`Domain::attach_device`] and
/// [`Domain::detach_device`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceFlags {
    /// Change the running domain (`VIR_DOMAIN_AFFECT_LIVE`).
    pub live: bool,
    /// Change the persistent definition (`VIR_DOMAIN_AFFECT_CONFIG`).
    pub config: bool,
}

impl DeviceFlags {
    /// The `virDomainModificationImpact` bits; neither flag set is
    /// `VIR_DOMAIN_AFFECT_CURRENT`, the domain's current state.
    fn bits(self) -> c_uint {
        let mut bits = ffi::VIR_DOMAIN_AFFECT_CURRENT;
        if self.live {
            bits |= ffi::VIR_DOMAIN_AFFECT_LIVE;
        }
        if self.config {
            bits |= ffi::VIR_DOMAIN_AFFECT_CONFIG;
        }
        bits
    }
}

/// A domain's state (`virDomainState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    /// `VIR_DOMAIN_NOSTATE`.
    NoState,
    /// `VIR_DOMAIN_RUNNING`.
    Running,
    /// `VIR_DOMAIN_BLOCKED`: blocked on a resource.
    Blocked,
    /// `VIR_DOMAIN_PAUSED`: paused by the user or by libvirt.
    Paused,
    /// `VIR_DOMAIN_SHUTDOWN`: being shut down.
    Shutdown,
    /// `VIR_DOMAIN_SHUTOFF`: not running.
    Shutoff,
    /// `VIR_DOMAIN_CRASHED`.
    Crashed,
    /// `VIR_DOMAIN_PMSUSPENDED`: suspended by guest power management.
    PmSuspended,
    /// A state newer than this module.
    Other(i32),
}

impl DomainState {
    /// The state for a `virDomainState` value.
    fn from_raw(state: c_int) -> DomainState {
        match state {
            0 => DomainState::NoState,
            1 => DomainState::Running,
            2 => DomainState::Blocked,
            3 => DomainState::Paused,
            4 => DomainState::Shutdown,
            5 => DomainState::Shutoff,
            6 => DomainState::Crashed,
            7 => DomainState::PmSuspended,
            other => DomainState::Other(other),
        }
    }

    /// A short name: `"no-state"`, `"running"`, `"blocked"`, `"paused"`,
    /// `"shutting-down"`, `"shut-off"`, `"crashed"`, `"pm-suspended"`, or
    /// `"unknown"` for [`DomainState::Other`].
    pub fn name(&self) -> &'static str {
        match self {
            DomainState::NoState => "no-state",
            DomainState::Running => "running",
            DomainState::Blocked => "blocked",
            DomainState::Paused => "paused",
            DomainState::Shutdown => "shutting-down",
            DomainState::Shutoff => "shut-off",
            DomainState::Crashed => "crashed",
            DomainState::PmSuspended => "pm-suspended",
            DomainState::Other(_) => "unknown",
        }
    }
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainState::Other(raw) => write!(f, "unknown ({raw})"),
            known => f.write_str(known.name()),
        }
    }
}

/// The version of the loaded libvirt library (`virGetVersion`):
/// `major * 1_000_000 + minor * 1_000 + release`. Loads the library if it is
/// not loaded yet.
pub fn library_version() -> Result<u64, Error> {
    let api = ffi::api()?;
    let mut version: c_ulong = 0;
    // SAFETY: `version` is a valid out-pointer; a null type asks for the
    // library's version only, leaving `typeVer` untouched (it may be null).
    let rc = unsafe {
        (api.virResetLastError)();
        (api.virGetVersion)(&mut version, ptr::null(), ptr::null_mut())
    };
    if rc < 0 {
        return Err(last_error(api, "virGetVersion"));
    }
    Ok(widen(version))
}

/// A connection to a hypervisor (`virConnectPtr`), closed on drop.
pub struct Connection {
    ptr: NonNull<ffi::VirConnect>,
    api: &'static ffi::Api,
}

// SAFETY: libvirt's API is thread-safe since 0.6.0: one virConnectPtr may be
// used from several threads at once (the drivers lock internally). The only
// per-thread state, the last error, is reset and read by each method on the
// thread that makes the call.
unsafe impl Send for Connection {}
// SAFETY: as for `Send`; every method takes `&self` and libvirt serialises
// what needs serialising.
unsafe impl Sync for Connection {}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("ptr", &self.ptr)
            .finish()
    }
}

impl Connection {
    /// Opens a read-write connection to `uri` (`virConnectOpen`), e.g.
    /// `"qemu:///system"`, or `"test:///default"` for libvirt's in-process
    /// test driver. Loads libvirt on first use.
    pub fn open(uri: &str) -> Result<Connection, Error> {
        let api = ffi::api()?;
        let uri = c_string("connection URI", uri)?;
        // SAFETY: `uri` is a NUL-terminated string that outlives the call.
        let conn = unsafe {
            (api.virResetLastError)();
            (api.virConnectOpen)(uri.as_ptr())
        };
        match NonNull::new(conn) {
            Some(ptr) => Ok(Connection { ptr, api }),
            None => Err(last_error(api, "virConnectOpen")),
        }
    }

    /// Defines a persistent domain from its XML (`virDomainDefineXML`),
    /// without starting it; redefines it if one of that name exists.
    pub fn define_domain(&self, xml: &str) -> Result<Domain, Error> {
        let xml = c_string("domain XML", xml)?;
        // SAFETY: `self.ptr` is an open connection and `xml` a NUL-terminated
        // string, both alive for the call.
        let dom = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainDefineXML)(self.ptr.as_ptr(), xml.as_ptr())
        };
        self.domain(dom, "virDomainDefineXML")
    }

    /// Creates and starts a transient domain from its XML
    /// (`virDomainCreateXML`, no flags): it disappears when it stops.
    pub fn create_transient(&self, xml: &str) -> Result<Domain, Error> {
        self.create(xml, 0)
    }

    /// Like [`Connection::create_transient`], with `VIR_DOMAIN_START_AUTODESTROY`:
    /// libvirt destroys the domain when this connection closes, also when the
    /// process holding it is killed.
    pub fn create_autodestroy(&self, xml: &str) -> Result<Domain, Error> {
        self.create(xml, ffi::VIR_DOMAIN_START_AUTODESTROY)
    }

    fn create(&self, xml: &str, flags: c_uint) -> Result<Domain, Error> {
        let xml = c_string("domain XML", xml)?;
        // SAFETY: as in `define_domain`; `flags` is a valid virDomainCreateFlags set.
        let dom = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainCreateXML)(self.ptr.as_ptr(), xml.as_ptr(), flags)
        };
        self.domain(dom, "virDomainCreateXML")
    }

    /// Looks a domain up by name (`virDomainLookupByName`). A domain that does
    /// not exist is an [`Error::Libvirt`] whose
    /// [`code_name`](Error::code_name) is `"no-domain"`.
    pub fn lookup_domain(&self, name: &str) -> Result<Domain, Error> {
        let name = c_string("domain name", name)?;
        // SAFETY: as in `define_domain`.
        let dom = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainLookupByName)(self.ptr.as_ptr(), name.as_ptr())
        };
        self.domain(dom, "virDomainLookupByName")
    }

    /// Every domain, running or not, persistent or transient
    /// (`virConnectListAllDomains` without filter flags).
    pub fn list_domains(&self) -> Result<Vec<Domain>, Error> {
        let mut array: *mut ffi::VirDomainPtr = ptr::null_mut();
        // SAFETY: `self.ptr` is an open connection, `array` a valid
        // out-pointer; flags 0 lists all domains.
        let count = unsafe {
            (self.api.virResetLastError)();
            (self.api.virConnectListAllDomains)(self.ptr.as_ptr(), &mut array, 0)
        };
        if count < 0 {
            return Err(last_error(self.api, "virConnectListAllDomains"));
        }
        let count = usize::try_from(count).unwrap_or(0);
        let mut domains = Vec::with_capacity(count);
        if array.is_null() {
            return Ok(domains);
        }
        for index in 0..count {
            // SAFETY: on success `array` holds `count` domain pointers (then a
            // NULL), each a reference that now belongs to the caller.
            let dom = unsafe { *array.add(index) };
            if let Some(ptr) = NonNull::new(dom) {
                domains.push(Domain { ptr, api: self.api });
            }
        }
        // SAFETY: libvirt allocated the array for the caller, to be released
        // with free(); its elements now belong to `domains`, and it is not
        // used again.
        unsafe { libc::free(array.cast()) };
        Ok(domains)
    }

    /// The hypervisor's driver name and version, and the version of the
    /// libvirt serving the connection.
    pub fn hypervisor(&self) -> Result<Hypervisor, Error> {
        // SAFETY: `self.ptr` is an open connection.
        let driver = unsafe {
            (self.api.virResetLastError)();
            (self.api.virConnectGetType)(self.ptr.as_ptr())
        };
        if driver.is_null() {
            return Err(last_error(self.api, "virConnectGetType"));
        }
        // SAFETY: a non-null result is a static NUL-terminated string owned by
        // libvirt (not freed by the caller), copied here.
        let driver = unsafe { CStr::from_ptr(driver) }
            .to_string_lossy()
            .into_owned();

        let mut version: c_ulong = 0;
        // SAFETY: `self.ptr` is an open connection, `version` a valid
        // out-pointer.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virConnectGetVersion)(self.ptr.as_ptr(), &mut version)
        };
        if rc < 0 {
            return Err(last_error(self.api, "virConnectGetVersion"));
        }

        let mut lib_version: c_ulong = 0;
        // SAFETY: as above.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virConnectGetLibVersion)(self.ptr.as_ptr(), &mut lib_version)
        };
        if rc < 0 {
            return Err(last_error(self.api, "virConnectGetLibVersion"));
        }

        Ok(Hypervisor {
            driver,
            version: widen(version),
            lib_version: widen(lib_version),
        })
    }

    /// The hypervisor's capabilities XML (`virConnectGetCapabilities`).
    pub fn capabilities(&self) -> Result<String, Error> {
        // SAFETY: `self.ptr` is an open connection.
        let xml = unsafe {
            (self.api.virResetLastError)();
            (self.api.virConnectGetCapabilities)(self.ptr.as_ptr())
        };
        if xml.is_null() {
            return Err(last_error(self.api, "virConnectGetCapabilities"));
        }
        // SAFETY: a non-null result is a NUL-terminated string the caller must
        // free, used nowhere else.
        Ok(unsafe { owned_string(xml) })
    }

    /// The connection's canonical URI (`virConnectGetURI`), e.g.
    /// `"qemu:///system"` for a connection opened with an alias.
    pub fn uri(&self) -> Result<String, Error> {
        // SAFETY: `self.ptr` is an open connection.
        let uri = unsafe {
            (self.api.virResetLastError)();
            (self.api.virConnectGetURI)(self.ptr.as_ptr())
        };
        if uri.is_null() {
            return Err(last_error(self.api, "virConnectGetURI"));
        }
        // SAFETY: a non-null result is a NUL-terminated string the caller must
        // free, used nowhere else.
        Ok(unsafe { owned_string(uri) })
    }

    /// Wraps the result of a call returning a domain, or reads the error.
    /// Must run right after `call` on the same thread.
    fn domain(&self, dom: ffi::VirDomainPtr, call: &'static str) -> Result<Domain, Error> {
        match NonNull::new(dom) {
            Some(ptr) => Ok(Domain { ptr, api: self.api }),
            None => Err(last_error(self.api, call)),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` holds one reference to an open connection, given
        // back here and never used again.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virConnectClose)(self.ptr.as_ptr())
        };
        if rc < 0 {
            let error = last_error(self.api, "virConnectClose");
            tracing::debug!(%error, "closing a libvirt connection failed");
        }
    }
}

/// A C `unsigned long` as `u64`: the same type on 64-bit Linux, wider on
/// 32-bit targets.
#[allow(clippy::useless_conversion)]
fn widen(value: c_ulong) -> u64 {
    u64::from(value)
}

/// `value` as a C string, or [`Error::InvalidArgument`] naming `what`.
fn c_string(what: &str, value: &str) -> Result<CString, Error> {
    CString::new(value).map_err(|error| {
        Error::InvalidArgument(format!(
            "{what} has a NUL byte at offset {}",
            error.nul_position()
        ))
    })
}

/// The calling thread's libvirt error, copied, after `call` failed. Must run
/// on the thread that made the call, before any other libvirt call there.
fn last_error(api: &ffi::Api, call: &'static str) -> Error {
    // SAFETY: virGetLastError takes no arguments; it returns null or this
    // thread's error object, valid until the next libvirt call on this thread.
    let error = unsafe { (api.virGetLastError)() };
    if error.is_null() {
        return Error::Libvirt {
            call,
            code: 0,
            domain: 0,
            message: "failed without reporting an error".to_owned(),
        };
    }
    // SAFETY: `error` points to an initialised virError owned by libvirt, and
    // its message is null or a NUL-terminated string; both are copied before
    // any other libvirt call.
    let (code, domain, message) = unsafe {
        let error = &*error;
        let message = if error.message.is_null() {
            String::from("no message")
        } else {
            CStr::from_ptr(error.message).to_string_lossy().into_owned()
        };
        (error.code, error.domain, message)
    };
    Error::Libvirt {
        call,
        code,
        domain,
        message,
    }
}

/// Copies and frees a string libvirt allocated for the caller.
///
/// # Safety
///
/// `string` must be non-null, NUL-terminated, allocated with `malloc` by
/// libvirt for the caller, and not used after this call.
unsafe fn owned_string(string: *mut c_char) -> String {
    // SAFETY: per this function's contract, `string` is a valid C string.
    let copy = unsafe { CStr::from_ptr(string) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: libvirt's API contract is that the caller releases such
    // strings with free(); the pointer is not used again.
    unsafe { libc::free(string.cast()) };
    copy
}

#[cfg(test)]
mod tests;
