//! libvirt at this level: connections and domains that live here as long as
//! the test holds them.
//!
//! ```ignore
//! use matryoshka_guest::libvirt::{Connection, DeviceFlags};
//!
//! fn define_and_start(xml: &str) -> Result<(), matryoshka_guest::host::Error> {
//!     let conn = Connection::open("qemu:///system")?;
//!     let domain = conn.define_domain(xml)?;
//!     domain.start()?;
//!     let status = domain.qemu_monitor_command(r#"{"execute":"query-status"}"#, false)?;
//!     assert!(status.contains("running"));
//!     domain.destroy()?;
//!     domain.undefine()?;
//!     Ok(())
//! }
//! ```
//!
//! Needs `--grant libvirt` (or `--grant libvirt=URI`). The runtime loads libvirt's
//! library at first use: where it is missing, calls fail with `unsupported` and
//! a message naming the package. A domain the test defined or created and left
//! behind is destroyed and undefined when its connection is dropped.

use std::fmt;

use crate::bindings::matryoshka::test::libvirt as wit;
use crate::host;

pub use wit::{DeviceFlags, DomainState, Hypervisor};

/// A libvirt error: the runtime's error plus libvirt's own code.
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    /// The error in the runtime's terms (kind, message, level).
    pub error: host::Error,
    /// libvirt's `virErrorNumber`; 0 when the error did not come from libvirt.
    pub code: i32,
    /// libvirt's name for `code`, e.g. `no-domain`, `xml-error`; empty when unknown.
    pub code_name: String,
}

impl From<wit::LibvirtError> for Error {
    fn from(e: wit::LibvirtError) -> Self {
        Self {
            error: e.error.into(),
            code: e.code,
            code_name: e.code_name,
        }
    }
}

impl From<Error> for host::Error {
    fn from(e: Error) -> Self {
        e.error
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {}

impl DeviceFlags {
    /// The running domain only.
    pub const LIVE: Self = Self {
        live: true,
        config: false,
    };
    /// The persistent definition only.
    pub const CONFIG: Self = Self {
        live: false,
        config: true,
    };
    /// Both.
    pub const LIVE_AND_CONFIG: Self = Self {
        live: true,
        config: true,
    };
}

/// A connection to a libvirt driver at this level.
pub struct Connection {
    inner: wit::Connection,
}

impl Connection {
    /// Opens `uri` (`qemu:///system`, `test:///default`, ...). For
    /// `qemu:///system` the runtime starts the daemon at this level if none runs.
    pub fn open(uri: &str) -> Result<Self, Error> {
        Ok(Self {
            inner: wit::Connection::open(uri)?,
        })
    }

    /// Defines a persistent domain from XML.
    pub fn define_domain(&self, xml: &str) -> Result<Domain, Error> {
        Ok(Domain {
            inner: self.inner.define_domain(xml)?,
        })
    }

    /// Creates and starts a transient domain from XML.
    pub fn create_domain(&self, xml: &str) -> Result<Domain, Error> {
        Ok(Domain {
            inner: self.inner.create_domain(xml)?,
        })
    }

    /// Finds a domain by name.
    pub fn lookup_domain(&self, name: &str) -> Result<Domain, Error> {
        Ok(Domain {
            inner: self.inner.lookup_domain(name)?,
        })
    }

    /// The names of every domain, running or not.
    pub fn list_domains(&self) -> Result<Vec<String>, Error> {
        Ok(self.inner.list_domains()?)
    }

    /// The hypervisor's driver and versions.
    pub fn hypervisor(&self) -> Result<Hypervisor, Error> {
        Ok(self.inner.hypervisor()?)
    }

    /// The capabilities XML.
    pub fn capabilities(&self) -> Result<String, Error> {
        Ok(self.inner.capabilities()?)
    }
}

/// A domain at this level.
pub struct Domain {
    inner: wit::Domain,
}

impl Domain {
    /// Its name.
    pub fn name(&self) -> Result<String, Error> {
        Ok(self.inner.name()?)
    }

    /// Its UUID.
    pub fn uuid(&self) -> Result<String, Error> {
        Ok(self.inner.uuid()?)
    }

    /// Its XML description; `inactive` for the persistent definition.
    pub fn xml_desc(&self, inactive: bool) -> Result<String, Error> {
        Ok(self.inner.xml_desc(inactive)?)
    }

    /// Starts a defined domain.
    pub fn start(&self) -> Result<(), Error> {
        Ok(self.inner.start()?)
    }

    /// Asks the guest to shut down.
    pub fn shutdown(&self) -> Result<(), Error> {
        Ok(self.inner.shutdown()?)
    }

    /// Stops it at once.
    pub fn destroy(&self) -> Result<(), Error> {
        Ok(self.inner.destroy()?)
    }

    /// Removes its persistent definition.
    pub fn undefine(&self) -> Result<(), Error> {
        Ok(self.inner.undefine()?)
    }

    /// Its run state.
    pub fn state(&self) -> Result<DomainState, Error> {
        Ok(self.inner.state()?)
    }

    /// Attaches a device from XML.
    pub fn attach_device(&self, xml: &str, flags: DeviceFlags) -> Result<(), Error> {
        Ok(self.inner.attach_device(xml, flags)?)
    }

    /// Detaches a device given by XML.
    pub fn detach_device(&self, xml: &str, flags: DeviceFlags) -> Result<(), Error> {
        Ok(self.inner.detach_device(xml, flags)?)
    }

    /// Sends a QMP JSON command (or an HMP line with `hmp`) to its QEMU monitor.
    pub fn qemu_monitor_command(&self, command: &str, hmp: bool) -> Result<String, Error> {
        Ok(self.inner.qemu_monitor_command(command, hmp)?)
    }
}
