//! Other levels of the chain, each running this same component.
//!
//! ```ignore
//! use matryoshka_guest::{host, nest::Guest};
//!
//! fn whoami(_: ()) -> Result<(String, u32), host::Error> {
//!     Ok((host::hostname(), host::level()))
//! }
//!
//! fn hostname_one_level_down() -> Result<(), host::Error> {
//!     let l1 = Guest::connect("local")?;
//!     let (name, level): (String, u32) = l1.call("whoami", &())?;
//!     assert_eq!(level, 1);
//!     Ok(())
//! }
//!
//! matryoshka_guest::suite! { tests: [hostname_one_level_down], remote: [whoami] }
//! ```
//!
//! The remote side keeps one instance per [`Guest`]: what a remote function
//! stores (in a `static`, say) is there for the next call through the same
//! handle, until the handle is dropped. Needs `--grant nest`.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ErrorKind;
use crate::bindings::matryoshka::test::nest as wit;
use crate::bindings::matryoshka::test::qmp as wit_qmp;
use crate::passthrough::ScsiAddress;

use crate::host::{Error, level_path};
pub use wit::Backend;

/// A virtual machine to boot as the next level; unset fields take the runtime's defaults.
///
/// ```ignore
/// let l1 = Guest::boot(&Vm::new().memory_mib(2048))?;
/// ```
#[derive(Debug, Clone)]
pub struct Vm {
    spec: wit::VmSpec,
}

impl Default for Vm {
    fn default() -> Self {
        Self {
            spec: wit::VmSpec {
                memory_mib: None,
                cpus: None,
                arch: None,
                image: None,
                accel: None,
                boot_timeout_ms: None,
                backend: None,
                scsi: Vec::new(),
            },
        }
    }
}

impl Vm {
    /// The defaults: the image this level booted from (or L0's image folder),
    /// the run's `--accel`, memory and CPUs sized from what this level has.
    pub fn new() -> Self {
        Self::default()
    }

    /// Memory in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.spec.memory_mib = Some(mib);
        self
    }

    /// Virtual CPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.spec.cpus = Some(cpus);
        self
    }

    /// Guest architecture (`x86_64`, `s390x`).
    pub fn arch(mut self, arch: &str) -> Self {
        self.spec.arch = Some(arch.to_string());
        self
    }

    /// Folder holding `kernel`, `initrd` and `root.img`, at the level that boots.
    pub fn image(mut self, dir: &str) -> Self {
        self.spec.image = Some(dir.to_string());
        self
    }

    /// `auto`, `kvm` or `tcg`.
    pub fn accel(mut self, accel: &str) -> Self {
        self.spec.accel = Some(accel.to_string());
        self
    }

    /// Deadline for the level to boot and its runtime to serve.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.spec.boot_timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// What runs the level: QEMU started by the runtime (the default) or a
    /// transient libvirt domain (needs `--grant libvirt`).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.spec.backend = Some(backend);
        self
    }

    /// Passes this level's SCSI device at `address` through to the level
    /// (see [`crate::passthrough`]; needs `--grant passthrough`).
    pub fn scsi(mut self, address: ScsiAddress) -> Self {
        self.spec.scsi.push(address);
        self
    }
}

/// A level below this one.
pub struct Guest {
    inner: wit::Guest_,
}

impl Guest {
    /// Reaches `target`: `local` or `ssh://user@host[:port]`.
    pub fn connect(target: &str) -> Result<Self, Error> {
        let inner = wit::Guest_::connect(target).map_err(Error::from)?;
        Ok(Self { inner })
    }

    /// Boots `vm` as the next level and reaches it; dropping the handle shuts it down.
    pub fn boot(vm: &Vm) -> Result<Self, Error> {
        let inner = wit::Guest_::boot(&vm.spec).map_err(Error::from)?;
        Ok(Self { inner })
    }

    /// The accelerator a booted level runs under (`kvm`, `tcg`); `None` for other levels.
    pub fn accel(&self) -> Option<String> {
        self.inner.accel()
    }

    /// Calls the remote function `function` with `args` and decodes its result.
    pub fn call<A: Serialize, R: DeserializeOwned>(
        &self,
        function: &str,
        args: &A,
    ) -> Result<R, Error> {
        self.call_inner(function, args, None)
    }

    /// Like [`Guest::call`], failing with a `timeout` error after `timeout`.
    pub fn call_with_timeout<A: Serialize, R: DeserializeOwned>(
        &self,
        function: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<R, Error> {
        self.call_inner(function, args, Some(timeout.as_millis() as u64))
    }

    fn call_inner<A: Serialize, R: DeserializeOwned>(
        &self,
        function: &str,
        args: &A,
        timeout_ms: Option<u64>,
    ) -> Result<R, Error> {
        let bad = |message: String| Error {
            kind: ErrorKind::InvalidArgument,
            message,
            level_path: level_path(),
        };
        let args = postcard::to_allocvec(args)
            .map_err(|e| bad(format!("arguments of `{function}` do not encode: {e}")))?;
        let bytes = self
            .inner
            .call(function, &args, timeout_ms)
            .map_err(Error::from)?;
        postcard::from_bytes(&bytes)
            .map_err(|e| bad(format!("result of `{function}` does not decode: {e}")))
    }

    /// Runs the QMP command `command` with `arguments` (a JSON object, or
    /// `Value::Null` for none) against the QEMU running that level, and returns
    /// QEMU's `return` value. Needs `--grant qmp` (or `qmp=COMMAND`); only for
    /// levels this level booted with the qemu backend.
    pub fn qmp(
        &self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, Error> {
        let arguments = (!arguments.is_null()).then(|| arguments.to_string());
        let reply = wit_qmp::execute(&self.inner, command, arguments.as_deref(), None)
            .map_err(Error::from)?;
        json(&reply)
    }

    /// Waits up to `timeout` for the QMP event `name` (e.g. `DEVICE_DELETED`)
    /// from the QEMU running that level; events since its first QMP use are kept.
    pub fn wait_qmp_event(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value, Error> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let event = wit_qmp::wait_event(&self.inner, name, ms).map_err(Error::from)?;
        json(&event)
    }

    /// Depth of that level.
    pub fn level(&self) -> u32 {
        self.inner.level()
    }

    /// Level path of that level, e.g. `L0/L1`.
    pub fn level_path(&self) -> String {
        self.inner.level_path()
    }

    /// Architecture of that level.
    pub fn arch(&self) -> String {
        self.inner.arch()
    }

    /// Host name of that level.
    pub fn hostname(&self) -> String {
        self.inner.hostname()
    }

    /// A shell command that reaches that level, when it is an SSH level.
    pub fn ssh_command(&self) -> Option<String> {
        self.inner.ssh_command()
    }
}

fn json(text: &str) -> Result<serde_json::Value, Error> {
    serde_json::from_str(text).map_err(|e| Error {
        kind: ErrorKind::Internal,
        message: format!("the runtime returned QMP text that is not JSON: {e}"),
        level_path: level_path(),
    })
}
