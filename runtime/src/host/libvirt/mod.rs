//! The `libvirt` interface: connections and domains at this level, through
//! libvirt's C library loaded on first use ([`crate::libvirt`]).
//!
//! Behind `--grant libvirt` (any URI) or `--grant libvirt=URI,...`. Every call
//! runs on a blocking thread (libvirt blocks, some calls for seconds). What an
//! instance may hold is bounded (connections, domains, XML size), and a domain
//! it defined or started and left behind is destroyed and undefined when the
//! connection it came from goes: nothing a test made outlives it.

use std::sync::Arc;

use wasmtime::component::Resource;

use super::HostState;
use super::bindings::matryoshka::test::libvirt::{
    DeviceFlags as WitFlags, DomainState as WitState, Host, HostConnection, HostDomain,
    Hypervisor as WitHypervisor, LibvirtError,
};
use super::bindings::matryoshka::test::types::ErrorKind;
use crate::libvirt::{self as virt, Connection, DeviceFlags, Domain, DomainState};

mod handles;

pub use handles::{ConnectionHandle, DomainHandle, Usage};
use handles::{Made, MadeList};

/// Most connections one instance holds at once.
const MAX_CONNECTIONS: usize = 16;
/// Most domain handles one instance holds at once.
const MAX_DOMAINS: usize = 256;
/// Most domains one connection defines, creates or starts (each may be a running QEMU).
const MAX_MADE: usize = 16;
/// Largest XML (or monitor command) accepted, bytes.
const MAX_XML: usize = 1 << 20;
/// Most domain names listed.
const MAX_LISTED: usize = 4096;

type Answer<T> = wasmtime::Result<Result<T, LibvirtError>>;

impl Host for HostState {}

impl HostConnection for HostState {
    async fn open(&mut self, uri: String) -> Answer<Resource<ConnectionHandle>> {
        let scope = &self.ctx.grants.libvirt;
        let named = matches!(scope, crate::config::Scope::Only(uris) if uris.contains(&uri));
        if scope.allows(&uri) && !named && !is_local_uri(&uri) {
            return Ok(Err(self.virt_error(
                ErrorKind::Denied,
                format!(
                    "`{uri}` reaches beyond this level (a transport, a host or parameters); \
                     --grant libvirt covers local URIs such as qemu:///system only: name this \
                     one with --grant libvirt={uri}"
                ),
            )));
        }
        if !self.ctx.grants.libvirt.allows(&uri) {
            let how = if self.ctx.grants.libvirt.any() {
                format!("add it with --grant libvirt={uri}")
            } else {
                "add --grant libvirt (any URI) or --grant libvirt=URI[,URI...]".to_string()
            };
            return Ok(Err(self.virt_error(
                ErrorKind::Denied,
                format!(
                    "libvirt at `{uri}` is not granted at {}; {how}",
                    self.ctx.level.path
                ),
            )));
        }
        let usage = self.virt_usage.clone();
        if !Usage::take(&usage.connections, MAX_CONNECTIONS) {
            return Ok(Err(self.virt_error(
                ErrorKind::InvalidArgument,
                format!("a test holds at most {MAX_CONNECTIONS} libvirt connections at once"),
            )));
        }
        let level = self.ctx.level.path.clone();
        let opened = {
            let uri = uri.clone();
            tokio::task::spawn_blocking(move || {
                crate::libvirt::daemon::ensure_for(&uri, &level)?;
                Connection::open(&uri)
            })
            .await?
        };
        match opened {
            Ok(conn) => Ok(Ok(self.table.push(ConnectionHandle {
                conn: Arc::new(conn),
                uri,
                made: Arc::default(),
                usage,
            })?)),
            Err(e) => {
                Usage::give(&usage.connections);
                Ok(Err(self.virt_failure(&format!("opening {uri}"), e)))
            }
        }
    }

    async fn define_domain(
        &mut self,
        conn: Resource<ConnectionHandle>,
        xml: String,
    ) -> Answer<Resource<DomainHandle>> {
        self.make_domain(conn, xml, false).await
    }

    async fn create_domain(
        &mut self,
        conn: Resource<ConnectionHandle>,
        xml: String,
    ) -> Answer<Resource<DomainHandle>> {
        self.make_domain(conn, xml, true).await
    }

    async fn lookup_domain(
        &mut self,
        conn: Resource<ConnectionHandle>,
        name: String,
    ) -> Answer<Resource<DomainHandle>> {
        let handle = self.table.get(&conn)?;
        let (c, made) = (handle.conn.clone(), handle.made.clone());
        let what = format!("looking up the domain {name:?}");
        let found = tokio::task::spawn_blocking(move || c.lookup_domain(&name)).await?;
        match found {
            Ok(domain) => self.push_domain(Arc::new(domain), made),
            Err(e) => Ok(Err(self.virt_failure(&what, e))),
        }
    }

    async fn list_domains(&mut self, conn: Resource<ConnectionHandle>) -> Answer<Vec<String>> {
        let c = self.table.get(&conn)?.conn.clone();
        let listed = tokio::task::spawn_blocking(move || {
            let domains = c.list_domains()?;
            domains
                .iter()
                .take(MAX_LISTED)
                .map(Domain::name)
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        Ok(listed.map_err(|e| self.virt_failure("listing domains", e)))
    }

    async fn hypervisor(&mut self, conn: Resource<ConnectionHandle>) -> Answer<WitHypervisor> {
        let c = self.table.get(&conn)?.conn.clone();
        let hv = tokio::task::spawn_blocking(move || c.hypervisor()).await?;
        Ok(hv
            .map(|h| WitHypervisor {
                driver: h.driver,
                version: version_text(h.version),
                library_version: version_text(h.lib_version),
            })
            .map_err(|e| self.virt_failure("asking the hypervisor's version", e)))
    }

    async fn capabilities(&mut self, conn: Resource<ConnectionHandle>) -> Answer<String> {
        let c = self.table.get(&conn)?.conn.clone();
        let caps = tokio::task::spawn_blocking(move || c.capabilities()).await?;
        Ok(caps.map_err(|e| self.virt_failure("reading the capabilities", e)))
    }

    async fn drop(&mut self, conn: Resource<ConnectionHandle>) -> wasmtime::Result<()> {
        let handle = self.table.delete(conn)?;
        // Cleaning up what the test left behind blocks (destroying a domain).
        tokio::task::spawn_blocking(move || drop(handle)).await?;
        Ok(())
    }
}

impl HostDomain for HostState {
    async fn name(&mut self, d: Resource<DomainHandle>) -> Answer<String> {
        self.on_domain(d, "reading its name", |d| d.name()).await
    }

    async fn uuid(&mut self, d: Resource<DomainHandle>) -> Answer<String> {
        self.on_domain(d, "reading its UUID", |d| d.uuid()).await
    }

    async fn xml_desc(&mut self, d: Resource<DomainHandle>, inactive: bool) -> Answer<String> {
        self.on_domain(d, "reading its XML", move |d| d.xml_desc(inactive))
            .await
    }

    async fn start(&mut self, d: Resource<DomainHandle>) -> Answer<()> {
        // A domain the test starts is the test's to stop, however it got the handle.
        let handle = self.table.get(&d)?;
        let (domain, made) = (handle.domain.clone(), handle.made.clone());
        let started = tokio::task::spawn_blocking(move || {
            domain.start()?;
            let uuid = domain.uuid()?;
            let mut made = made.lock().unwrap_or_else(|e| e.into_inner());
            if !made
                .iter()
                .any(|m| m.domain.uuid().ok().as_deref() == Some(uuid.as_str()))
            {
                made.push(Made {
                    name: domain.name().unwrap_or_default(),
                    domain,
                    defined: false,
                });
            }
            Ok(())
        })
        .await?;
        Ok(started.map_err(|e| self.virt_failure("starting it", e)))
    }

    async fn shutdown(&mut self, d: Resource<DomainHandle>) -> Answer<()> {
        self.on_domain(d, "shutting it down", |d| d.shutdown())
            .await
    }

    async fn destroy(&mut self, d: Resource<DomainHandle>) -> Answer<()> {
        self.on_domain(d, "destroying it", |d| d.destroy()).await
    }

    async fn undefine(&mut self, d: Resource<DomainHandle>) -> Answer<()> {
        self.on_domain(d, "undefining it", |d| d.undefine()).await
    }

    async fn state(&mut self, d: Resource<DomainHandle>) -> Answer<WitState> {
        self.on_domain(d, "reading its state", |d| {
            d.state().map(|(state, _reason)| match state {
                DomainState::Running => WitState::Running,
                DomainState::Blocked => WitState::Blocked,
                DomainState::Paused => WitState::Paused,
                DomainState::Shutdown => WitState::Shutdown,
                DomainState::Shutoff => WitState::ShutOff,
                DomainState::Crashed => WitState::Crashed,
                DomainState::PmSuspended => WitState::PmSuspended,
                DomainState::NoState | DomainState::Other(_) => WitState::NoState,
            })
        })
        .await
    }

    async fn attach_device(
        &mut self,
        d: Resource<DomainHandle>,
        xml: String,
        flags: WitFlags,
    ) -> Answer<()> {
        self.change_device(d, xml, flags, true).await
    }

    async fn detach_device(
        &mut self,
        d: Resource<DomainHandle>,
        xml: String,
        flags: WitFlags,
    ) -> Answer<()> {
        self.change_device(d, xml, flags, false).await
    }

    async fn qemu_monitor_command(
        &mut self,
        d: Resource<DomainHandle>,
        command: String,
        hmp: bool,
    ) -> Answer<String> {
        if let Err(e) = self.check_size("monitor command", &command) {
            return Ok(Err(e));
        }
        self.on_domain(d, "sending a monitor command", move |d| {
            d.qemu_monitor_command(&command, hmp)
        })
        .await
    }

    async fn drop(&mut self, d: Resource<DomainHandle>) -> wasmtime::Result<()> {
        let handle = self.table.delete(d)?;
        tokio::task::spawn_blocking(move || drop(handle)).await?;
        Ok(())
    }
}

impl HostState {
    /// Defines (or, `start`, creates and starts) a domain from XML, remembering
    /// it for the cleanup when the connection goes. A domain whose name exists
    /// already is refused: redefining it would hand someone else's domain to
    /// that cleanup.
    async fn make_domain(
        &mut self,
        conn: Resource<ConnectionHandle>,
        xml: String,
        start: bool,
    ) -> Answer<Resource<DomainHandle>> {
        if let Err(e) = self.check_size("domain XML", &xml) {
            return Ok(Err(e));
        }
        let handle = self.table.get(&conn)?;
        let (c, made) = (handle.conn.clone(), handle.made.clone());
        if made.lock().unwrap_or_else(|e| e.into_inner()).len() >= MAX_MADE {
            return Ok(Err(self.virt_error(
                ErrorKind::InvalidArgument,
                format!(
                    "a connection makes at most {MAX_MADE} domains; drop it (its domains are \
                     destroyed) and open another"
                ),
            )));
        }
        let what = if start {
            "creating a transient domain"
        } else {
            "defining a domain"
        };
        let list = made.clone();
        let result = tokio::task::spawn_blocking(move || {
            if let Some(name) = domain_name(&xml)
                && c.lookup_domain(&name).is_ok()
            {
                return Err(Err(format!(
                    "a domain named {name:?} exists already; a test makes domains of its own \
                     (another name) and leaves the others alone"
                )));
            }
            let domain = if start {
                c.create_transient(&xml)
            } else {
                c.define_domain(&xml)
            }
            .map_err(Ok)?;
            let domain = Arc::new(domain);
            // Remembered here, on the blocking thread: a test cancelled while this
            // runs still leaves the domain to the cleanup.
            list.lock().unwrap_or_else(|e| e.into_inner()).push(Made {
                name: domain.name().unwrap_or_default(),
                domain: domain.clone(),
                defined: !start,
            });
            Ok::<_, Result<virt::Error, String>>(domain)
        })
        .await?;
        match result {
            Ok(domain) => self.push_domain(domain, made),
            Err(Ok(e)) => Ok(Err(self.virt_failure(what, e))),
            Err(Err(m)) => Ok(Err(self.virt_error(ErrorKind::InvalidArgument, m))),
        }
    }

    /// Attaches (`attach`) or detaches a device given by XML.
    async fn change_device(
        &mut self,
        d: Resource<DomainHandle>,
        xml: String,
        flags: WitFlags,
        attach: bool,
    ) -> Answer<()> {
        if let Err(e) = self.check_size("device XML", &xml) {
            return Ok(Err(e));
        }
        let flags = device_flags(flags);
        let what = if attach {
            "attaching a device"
        } else {
            "detaching a device"
        };
        self.on_domain(d, what, move |d| {
            if attach {
                d.attach_device(&xml, flags)
            } else {
                d.detach_device(&xml, flags)
            }
        })
        .await
    }

    fn push_domain(
        &mut self,
        domain: Arc<Domain>,
        made: MadeList,
    ) -> Answer<Resource<DomainHandle>> {
        let usage = self.virt_usage.clone();
        if !Usage::take(&usage.domains, MAX_DOMAINS) {
            return Ok(Err(self.virt_error(
                ErrorKind::InvalidArgument,
                format!("a test holds at most {MAX_DOMAINS} libvirt domain handles at once"),
            )));
        }
        Ok(Ok(self.table.push(DomainHandle {
            domain,
            made,
            usage,
        })?))
    }

    async fn on_domain<T, F>(&mut self, d: Resource<DomainHandle>, what: &str, f: F) -> Answer<T>
    where
        T: Send + 'static,
        F: FnOnce(&Domain) -> Result<T, virt::Error> + Send + 'static,
    {
        let domain = self.table.get(&d)?.domain.clone();
        let result = tokio::task::spawn_blocking(move || f(&domain)).await?;
        Ok(result.map_err(|e| self.virt_failure(what, e)))
    }

    fn check_size(&self, what: &str, text: &str) -> Result<(), LibvirtError> {
        if text.len() <= MAX_XML {
            return Ok(());
        }
        Err(self.virt_error(
            ErrorKind::InvalidArgument,
            format!(
                "{what} of {} bytes; at most {MAX_XML} are taken",
                text.len()
            ),
        ))
    }

    fn virt_error(&self, kind: ErrorKind, message: String) -> LibvirtError {
        LibvirtError {
            error: self.error(kind, message),
            code: 0,
            code_name: String::new(),
        }
    }

    /// libvirt's error in the interface's terms.
    fn virt_failure(&self, what: &str, e: virt::Error) -> LibvirtError {
        let at = &self.ctx.level.path;
        match e {
            virt::Error::Unavailable(m) => {
                self.virt_error(ErrorKind::Unsupported, format!("libvirt at {at}: {m}"))
            }
            virt::Error::InvalidArgument(m) => self.virt_error(
                ErrorKind::InvalidArgument,
                format!("libvirt at {at}, {what}: {m}"),
            ),
            virt::Error::Libvirt { code, .. } => {
                let name = e.code_name().unwrap_or_default();
                let kind = match name {
                    "no-domain" | "no-network" | "no-storage-pool" | "no-storage-vol"
                    | "no-nwfilter" | "no-secret" | "no-node-device" | "no-interface"
                    | "no-domain-snapshot" => ErrorKind::NotFound,
                    "xml-error" | "xml-detail" | "no-name" | "invalid-arg"
                    | "config-unsupported" | "operation-invalid" | "dom-exist" => {
                        ErrorKind::InvalidArgument
                    }
                    "no-support"
                    | "argument-unsupported"
                    | "operation-unsupported"
                    | "no-connect" => ErrorKind::Unsupported,
                    "auth-failed" | "auth-cancelled" | "auth-unavailable" | "access-denied"
                    | "operation-denied" => ErrorKind::Denied,
                    "operation-timeout" => ErrorKind::Timeout,
                    _ => ErrorKind::Io,
                };
                LibvirtError {
                    error: self.error(kind, format!("libvirt at {at}, {what}: {e}")),
                    code,
                    code_name: name.to_string(),
                }
            }
        }
    }
}

/// Whether `uri` names a driver on this machine: `driver:///path`, no
/// transport (`qemu+ssh`), no host, no parameters (`?command=`, `?socket=`).
fn is_local_uri(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return false;
    };
    !scheme.contains('+') && rest.starts_with('/') && !uri.contains('?')
}

/// The domain's `<name>` in its XML, if it has one.
fn domain_name(xml: &str) -> Option<String> {
    let start = xml.find("<name>")? + "<name>".len();
    let end = start + xml[start..].find("</name>")?;
    Some(xml[start..end].trim().to_string()).filter(|n| !n.is_empty())
}

fn device_flags(f: WitFlags) -> DeviceFlags {
    DeviceFlags {
        live: f.live,
        config: f.config,
    }
}

/// libvirt's `major * 1,000,000 + minor * 1,000 + micro` as `major.minor.micro`.
fn version_text(v: u64) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1_000) % 1_000, v % 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_uris_are_covered_by_the_whole_grant() {
        for uri in [
            "qemu:///system",
            "qemu:///session",
            "test:///default",
            "test:///tmp/x.xml",
        ] {
            assert!(is_local_uri(uri), "{uri}");
        }
        for uri in [
            "qemu+ssh://root@host/system",
            "qemu+ext:///system?command=/bin/sh",
            "qemu://host/system",
            "qemu:///system?socket=/tmp/s",
            "qemu",
        ] {
            assert!(!is_local_uri(uri), "{uri}");
        }
    }

    #[test]
    fn the_domain_name_is_read_from_its_xml() {
        assert_eq!(
            domain_name("<domain type='kvm'><name> mtr-1 </name></domain>").as_deref(),
            Some("mtr-1")
        );
        assert_eq!(domain_name("<domain type='kvm'/>"), None);
    }

    #[test]
    fn versions_read_as_libvirt_writes_them() {
        assert_eq!(version_text(9_000_000), "9.0.0");
        assert_eq!(version_text(7_002_019), "7.2.19");
    }

    #[test]
    fn handle_counts_are_bounded() {
        let usage = Usage::default();
        for _ in 0..3 {
            assert!(Usage::take(&usage.connections, 3));
        }
        assert!(!Usage::take(&usage.connections, 3));
        Usage::give(&usage.connections);
        assert!(Usage::take(&usage.connections, 3));
    }
}
