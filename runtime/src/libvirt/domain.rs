//! Domains (`virDomainPtr`).

use std::ffi::{CStr, c_char, c_int};
use std::fmt;
use std::ptr::{self, NonNull};

use super::{DeviceFlags, DomainState, Error, c_string, ffi, last_error, owned_string};

/// A domain (`virDomainPtr`), freed on drop; the domain itself is not
/// affected by the drop.
pub struct Domain {
    pub(super) ptr: NonNull<ffi::VirDomain>,
    pub(super) api: &'static ffi::Api,
}

// SAFETY: a virDomainPtr is a reference-counted, internally locked libvirt
// object usable from any thread (libvirt is thread-safe since 0.6.0); the
// per-thread last error is read by each method on its own thread.
unsafe impl Send for Domain {}
// SAFETY: as for `Send`; every method takes `&self`.
unsafe impl Sync for Domain {}

impl fmt::Debug for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Domain");
        match self.name() {
            Ok(name) => debug.field("name", &name),
            Err(_) => debug.field("ptr", &self.ptr),
        };
        debug.finish()
    }
}

impl Domain {
    /// The domain's name (`virDomainGetName`).
    pub fn name(&self) -> Result<String, Error> {
        // SAFETY: `self.ptr` is a live domain reference.
        let name = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainGetName)(self.ptr.as_ptr())
        };
        if name.is_null() {
            return Err(last_error(self.api, "virDomainGetName"));
        }
        // SAFETY: a non-null result is a NUL-terminated string owned by the
        // domain object (not freed by the caller), alive while `self` is;
        // copied here.
        Ok(unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned())
    }

    /// The domain's UUID in its 36-character text form
    /// (`virDomainGetUUIDString`).
    pub fn uuid(&self) -> Result<String, Error> {
        let mut buf = [0u8; ffi::VIR_UUID_STRING_BUFLEN];
        // SAFETY: `self.ptr` is a live domain reference; `buf` has the
        // VIR_UUID_STRING_BUFLEN bytes libvirt writes (with the NUL).
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainGetUUIDString)(self.ptr.as_ptr(), buf.as_mut_ptr().cast::<c_char>())
        };
        if rc < 0 {
            return Err(last_error(self.api, "virDomainGetUUIDString"));
        }
        let uuid = CStr::from_bytes_until_nul(&buf).map_err(|_| Error::Libvirt {
            call: "virDomainGetUUIDString",
            code: 0,
            domain: 0,
            message: "the UUID is not NUL-terminated".to_owned(),
        })?;
        Ok(uuid.to_string_lossy().into_owned())
    }

    /// The domain's XML (`virDomainGetXMLDesc`): with `inactive`, the
    /// definition it will boot with next (`VIR_DOMAIN_XML_INACTIVE`) rather
    /// than the running one.
    pub fn xml_desc(&self, inactive: bool) -> Result<String, Error> {
        let flags = if inactive {
            ffi::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        // SAFETY: `self.ptr` is a live domain reference; the flags are
        // virDomainXMLFlags.
        let xml = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainGetXMLDesc)(self.ptr.as_ptr(), flags)
        };
        if xml.is_null() {
            return Err(last_error(self.api, "virDomainGetXMLDesc"));
        }
        // SAFETY: a non-null result is a NUL-terminated string the caller must
        // free, used nowhere else.
        Ok(unsafe { owned_string(xml) })
    }

    /// Starts a defined domain (`virDomainCreate`).
    pub fn start(&self) -> Result<(), Error> {
        // SAFETY: `self.ptr` is a live domain reference.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainCreate)(self.ptr.as_ptr())
        };
        self.check(rc, "virDomainCreate")
    }

    /// Asks the guest to shut down (`virDomainShutdown`); returns before it
    /// has. Poll [`Domain::state`] to see it stop.
    pub fn shutdown(&self) -> Result<(), Error> {
        // SAFETY: `self.ptr` is a live domain reference.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainShutdown)(self.ptr.as_ptr())
        };
        self.check(rc, "virDomainShutdown")
    }

    /// Stops the domain at once, like pulling the plug (`virDomainDestroy`).
    /// A transient domain disappears.
    pub fn destroy(&self) -> Result<(), Error> {
        // SAFETY: `self.ptr` is a live domain reference.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainDestroy)(self.ptr.as_ptr())
        };
        self.check(rc, "virDomainDestroy")
    }

    /// Removes the persistent definition (`virDomainUndefine`); a running
    /// domain goes on as a transient one.
    pub fn undefine(&self) -> Result<(), Error> {
        // SAFETY: `self.ptr` is a live domain reference.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainUndefine)(self.ptr.as_ptr())
        };
        self.check(rc, "virDomainUndefine")
    }

    /// The domain's state and the reason for it (`virDomainGetState`); the
    /// reason is the state's own `virDomain*Reason` enum, e.g.
    /// `VIR_DOMAIN_SHUTOFF_DESTROYED` (2) for [`DomainState::Shutoff`].
    pub fn state(&self) -> Result<(DomainState, i32), Error> {
        let mut state: c_int = 0;
        let mut reason: c_int = 0;
        // SAFETY: `self.ptr` is a live domain reference; `state` and `reason`
        // are valid out-pointers; flags must be 0.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainGetState)(self.ptr.as_ptr(), &mut state, &mut reason, 0)
        };
        if rc < 0 {
            return Err(last_error(self.api, "virDomainGetState"));
        }
        Ok((DomainState::from_raw(state), reason))
    }

    /// Attaches the device described by `xml` (`virDomainAttachDeviceFlags`).
    pub fn attach_device(&self, xml: &str, flags: DeviceFlags) -> Result<(), Error> {
        let xml = c_string("device XML", xml)?;
        // SAFETY: `self.ptr` is a live domain reference, `xml` a NUL-terminated
        // string alive for the call; the flags are
        // virDomainModificationImpact bits.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainAttachDeviceFlags)(self.ptr.as_ptr(), xml.as_ptr(), flags.bits())
        };
        self.check(rc, "virDomainAttachDeviceFlags")
    }

    /// Detaches the device described by `xml` (`virDomainDetachDeviceFlags`).
    /// For a live detach libvirt may return before the guest has released the
    /// device.
    pub fn detach_device(&self, xml: &str, flags: DeviceFlags) -> Result<(), Error> {
        let xml = c_string("device XML", xml)?;
        // SAFETY: as in `attach_device`.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainDetachDeviceFlags)(self.ptr.as_ptr(), xml.as_ptr(), flags.bits())
        };
        self.check(rc, "virDomainDetachDeviceFlags")
    }

    /// Sends a command to QEMU's monitor and returns its reply
    /// (`virDomainQemuMonitorCommand`, from `libvirt-qemu.so.0`, loaded on the
    /// first call): a QMP JSON command, or with `hmp` a human monitor command
    /// (`VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP`). Only the QEMU driver supports
    /// it; other drivers fail with `"no-support"`.
    pub fn qemu_monitor_command(&self, command: &str, hmp: bool) -> Result<String, Error> {
        let qemu = ffi::qemu_api()?;
        let command = c_string("monitor command", command)?;
        let flags = if hmp {
            ffi::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        } else {
            ffi::VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT
        };
        let mut reply: *mut c_char = ptr::null_mut();
        // SAFETY: `self.ptr` is a live domain reference, `command` a
        // NUL-terminated string alive for the call, `reply` a valid
        // out-pointer. libvirt-qemu records errors in libvirt.so.0's
        // thread-local slot, which `self.api` resets and reads.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (qemu.virDomainQemuMonitorCommand)(
                self.ptr.as_ptr(),
                command.as_ptr(),
                &mut reply,
                flags,
            )
        };
        if rc < 0 {
            return Err(last_error(self.api, "virDomainQemuMonitorCommand"));
        }
        if reply.is_null() {
            return Ok(String::new());
        }
        // SAFETY: on success `reply` is a NUL-terminated string the caller
        // must free, used nowhere else.
        Ok(unsafe { owned_string(reply) })
    }

    /// Whether the domain has a persistent definition
    /// (`virDomainIsPersistent`), as opposed to a transient one.
    pub fn is_persistent(&self) -> Result<bool, Error> {
        // SAFETY: `self.ptr` is a live domain reference.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainIsPersistent)(self.ptr.as_ptr())
        };
        if rc < 0 {
            return Err(last_error(self.api, "virDomainIsPersistent"));
        }
        Ok(rc == 1)
    }

    /// `Ok` for a 0 return, the thread's libvirt error for a negative one.
    /// Must run right after `call` on the same thread.
    fn check(&self, rc: c_int, call: &'static str) -> Result<(), Error> {
        if rc < 0 {
            Err(last_error(self.api, call))
        } else {
            Ok(())
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` holds one reference to the domain object, given
        // back here and never used again.
        let rc = unsafe {
            (self.api.virResetLastError)();
            (self.api.virDomainFree)(self.ptr.as_ptr())
        };
        if rc < 0 {
            let error = last_error(self.api, "virDomainFree");
            tracing::debug!(%error, "freeing a libvirt domain failed");
        }
    }
}
