//! The libvirt backend: a level booted as a transient libvirt domain of this
//! level's `qemu:///system`, from the same image, kernel command line and
//! initramfs (with the runtime) as the qemu backend's.
//!
//! The relay is a virtio-serial channel whose unix socket this runtime listens
//! on before the domain starts: QEMU connects at its start, so no byte the
//! level's runtime writes is lost. The domain is created with
//! `VIR_DOMAIN_START_AUTODESTROY`: libvirt destroys it when this runtime's
//! connection closes, also when the runtime is killed. SSH for people is a
//! user-mode network added with `<qemu:commandline>` (libvirt's own user
//! network forwards no ports).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::arch::Arch;
use super::argv::{self, Accel, HOST_KEY_FW_CFG, LOG_PORT, MachineSpec, RELAY_PORT};
use super::boot::{
    BootPlan, Booted, VmRequest, free_port, has_bytes, host_key_file, init_failure, machine_spec,
    note_serving,
};
use super::image::Image;
use super::machine::Machine;
use super::qemu::{LevelFiles, tail};
use crate::config::AccelPolicy;
use crate::libvirt::{Connection, Domain, DomainState};
use crate::scsi::Device;

/// The libvirt URI levels are defined at.
pub const URI: &str = "qemu:///system";
/// How long QEMU has to connect to the relay socket once the domain started.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);

/// Boots `plan`'s level as a transient domain and waits until its runtime serves.
pub(super) async fn boot(
    req: &VmRequest,
    plan: &BootPlan,
    image: &Image,
    arch: Arch,
    timeout: Duration,
) -> Result<Booted, String> {
    if arch != Arch::X86_64 {
        return Err(format!(
            "cannot boot {} with the libvirt backend: it boots x86_64 levels; use the qemu backend",
            plan.path
        ));
    }
    let (accel, accel_reason) = choose(req.accel.unwrap_or(plan.policy));
    let level = plan.path.clone();
    let conn = tokio::task::spawn_blocking(move || {
        crate::libvirt::daemon::ensure_for(URI, &level)?;
        Connection::open(URI)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot boot {} with libvirt: {e}", plan.path))?;
    let conn = Arc::new(conn);
    let name = domain_name(&plan.path);
    let files = LevelFiles {
        console: plan.run_dir.join(format!("{name}.console")),
        qemu_log: PathBuf::from(format!("/var/log/libvirt/qemu/{name}.log")),
        level_log: plan.run_dir.join(format!("{name}.log")),
        monitor: None,
    };
    // The relay socket lives in a private folder of its own: short enough for a
    // socket path wherever the run folder is.
    let socket_dir = tempfile::Builder::new()
        .prefix("matryoshka-relay.")
        .tempdir()
        .map_err(|e| format!("cannot make a folder for the relay socket: {e}"))?;
    let socket = socket_dir.path().join("relay.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::UnixListener::from_std)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    let host_key = host_key_file(plan, arch, &name)?;
    let mut spec = machine_spec(plan, image, arch, accel, req, free_port()?, &files)?;
    spec.host_key = host_key.as_ref().map(|f| f.path().to_path_buf());
    let xml = domain_xml(&spec, &name, &socket, &plan.scsi)?;
    let xml_path = plan.run_dir.join(format!("{name}.xml"));
    let _ = std::fs::write(&xml_path, &xml);
    tracing::info!(level = %plan.path, "booting as libvirt domain {name} ({})", xml_path.display());
    let _ = std::fs::remove_file(&files.console);
    let started = Instant::now();
    let created = {
        let conn = conn.clone();
        tokio::task::spawn_blocking(move || conn.create_autodestroy(&xml))
            .await
            .map_err(|e| e.to_string())?
    };
    let domain = created.map_err(|e| {
        format!(
            "libvirt could not start {} (domain {name}, XML in {}): {e}",
            plan.path,
            xml_path.display()
        )
    })?;
    let domain = Arc::new(domain);
    let monitor = super::monitor::QmpPort::libvirt(domain.clone());
    let mut machine = DomainMachine {
        _conn: conn,
        domain: Some(domain),
        name,
        files,
        _socket_dir: socket_dir,
    };
    let relay = match tokio::time::timeout(CONNECT_DEADLINE, listener.accept()).await {
        Ok(Ok((stream, _))) => stream.into_std().map_err(|e| e.to_string())?,
        Ok(Err(e)) => return Err(format!("accepting the relay of {}: {e}", plan.path)),
        Err(_) => {
            let end = machine.describe_end();
            machine.kill();
            return Err(format!(
                "the QEMU of {} did not connect to its relay socket within {} s; {end}",
                plan.path,
                CONNECT_DEADLINE.as_secs()
            ));
        }
    };
    drop(host_key);
    wait_ready(&mut machine, &relay, plan, started, timeout).await?;
    Ok(Booted {
        machine: Box::new(machine),
        relay,
        qmp: Some(monitor),
        ssh_port: spec.ssh_port,
        accel,
        accel_reason,
        boot_time: started.elapsed(),
        restorable: None,
    })
}

/// The accelerator for a policy: KVM where `/dev/kvm` opens, under `auto`.
fn choose(policy: AccelPolicy) -> (Accel, String) {
    match policy {
        AccelPolicy::Kvm => (Accel::Kvm, "--accel kvm".into()),
        AccelPolicy::Tcg => (Accel::Tcg, "--accel tcg".into()),
        AccelPolicy::Auto => {
            let usable = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if usable {
                (
                    Accel::Kvm,
                    "auto: /dev/kvm opens here (libvirt domain)".into(),
                )
            } else {
                (
                    Accel::Tcg,
                    "auto: no usable /dev/kvm here (libvirt domain)".into(),
                )
            }
        }
    }
}

/// A name unique to this runtime and level: `matryoshka-L0-L1-<pid>-<n>`.
fn domain_name(path: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "matryoshka-{}-{}-{n}",
        path.replace('/', "-"),
        std::process::id()
    )
}

async fn wait_ready(
    machine: &mut DomainMachine,
    relay: &std::os::unix::net::UnixStream,
    plan: &BootPlan,
    started: Instant,
    timeout: Duration,
) -> Result<(), String> {
    let mut last_state_check = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if has_bytes(relay) {
            note_serving(&plan.path, started, &read(&machine.files.level_log));
            return Ok(());
        }
        let console = read(&machine.files.console);
        if let Some(fail) = init_failure(&console, &read(&machine.files.level_log)) {
            let end = machine.describe_end();
            machine.kill();
            return Err(format!(
                "{} failed to boot: {}; {end}",
                plan.path,
                fail.trim_start_matches(": ")
            ));
        }
        if last_state_check.elapsed() > Duration::from_millis(500) {
            last_state_check = Instant::now();
            if let Some(domain) = machine.domain.clone() {
                let state = tokio::task::spawn_blocking(move || domain.state())
                    .await
                    .map_err(|e| e.to_string())?;
                if !matches!(state, Ok((DomainState::Running, _))) {
                    let end = machine.describe_end();
                    machine.kill();
                    return Err(format!(
                        "{} did not boot: its domain {} {}",
                        plan.path, machine.name, end
                    ));
                }
            }
        }
        if started.elapsed() > timeout {
            let end = machine.describe_end();
            machine.kill();
            return Err(format!(
                "{} was not serving within {:.1} s (libvirt domain {}); {end}",
                plan.path,
                timeout.as_secs_f64(),
                machine.name
            ));
        }
    }
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// A level's libvirt domain; destroyed when dropped.
pub struct DomainMachine {
    /// Kept open for as long as the domain runs: closing it destroys the domain.
    _conn: Arc<Connection>,
    domain: Option<Arc<Domain>>,
    name: String,
    files: LevelFiles,
    _socket_dir: tempfile::TempDir,
}

impl Machine for DomainMachine {
    fn console_path(&self) -> &Path {
        &self.files.console
    }

    fn monitor(&self) -> Option<crate::wire::Monitor> {
        Some(crate::wire::Monitor::Libvirt {
            domain: self.name.clone(),
        })
    }

    fn level_log_path(&self) -> &Path {
        &self.files.level_log
    }

    fn qemu_log_path(&self) -> &Path {
        &self.files.qemu_log
    }

    fn kill(&mut self) {
        if let Some(domain) = self.domain.take()
            && let Err(e) = domain.destroy()
            && !matches!(e.code_name(), Some("no-domain" | "operation-invalid"))
        {
            tracing::warn!("cannot destroy the domain {}: {e}", self.name);
        }
    }

    fn describe_end(&mut self) -> String {
        let state = match self.domain.as_ref().map(|d| d.state()) {
            Some(Ok((state, reason))) => format!("is {state} (reason {reason})"),
            Some(Err(e)) => format!("is gone ({e})"),
            None => "was destroyed".to_string(),
        };
        let mut said = format!(
            "its domain {} {state}; QEMU's log: {}; console tail:\n{}",
            self.name,
            self.files.qemu_log.display(),
            tail(&read(&self.files.console))
        );
        let log = read(&self.files.level_log);
        if !log.trim().is_empty() {
            let _ = write!(
                said,
                "\nlevel log tail ({}):\n{}",
                self.files.level_log.display(),
                tail(&log)
            );
        }
        said
    }
}

impl Drop for DomainMachine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Escapes text for XML character data and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// A path as libvirt takes it: UTF-8 and absolute.
fn path_text<'a>(role: &str, path: &'a Path) -> Result<&'a str, String> {
    let text = path
        .to_str()
        .ok_or_else(|| format!("the {role} path {} is not UTF-8", path.display()))?;
    if !path.is_absolute() {
        return Err(format!("the {role} path {text} is not absolute"));
    }
    Ok(text)
}

/// The domain XML of a level: every PCI device on the root bus (the level's
/// kernel scans bus 0 only), the relay and log as virtio-serial channels, the
/// SCSI devices passed through as `<hostdev type='scsi'>`.
pub fn domain_xml(
    spec: &MachineSpec,
    name: &str,
    relay_socket: &Path,
    scsi: &[Device],
) -> Result<String, String> {
    let pci = |slot: u32| {
        format!(
            "<address type='pci' domain='0x0000' bus='0x00' slot='{slot:#04x}' function='0x0'/>"
        )
    };
    let (domain_type, cpu) = match spec.accel {
        Accel::Kvm => ("kvm", "<cpu mode='host-passthrough'/>"),
        Accel::Tcg => ("qemu", "<cpu mode='maximum'/>"),
    };
    let root = path_text("root", &spec.root)?;
    let root_is_block = std::fs::metadata(root)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    let (disk_type, source_attr) = if root_is_block {
        ("block", "dev")
    } else {
        ("file", "file")
    };
    let mut x = String::new();
    let _ = write!(
        x,
        "<domain type='{domain_type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\
         <name>{}</name><memory unit='MiB'>{}</memory><vcpu>{}</vcpu>\
         <os><type arch='x86_64' machine='{}'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
         <cmdline>{}</cmdline></os>\
         <features><acpi/></features>{cpu}<clock offset='utc'/>\
         <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>\
         <devices>",
        esc(name),
        spec.memory_mib,
        spec.cpus,
        spec.arch.machine(),
        esc(path_text("kernel", &spec.kernel)?),
        esc(path_text("initramfs", &spec.initrd)?),
        esc(&argv::kernel_cmdline(spec)?),
    );
    let _ = write!(
        x,
        "<disk type='{disk_type}' device='disk'><driver name='qemu' type='raw' cache='none' io='native'/>\
         <source {source_attr}='{}'/><target dev='vda' bus='virtio'/><readonly/>{}</disk>\
         <controller type='usb' model='none'/>\
         <controller type='virtio-serial' index='0'>{}</controller>\
         <controller type='scsi' index='0' model='virtio-scsi'>{}</controller>\
         <serial type='file'><source path='{}'/><target port='0'/></serial>\
         <channel type='unix'><source mode='connect' path='{}'/><target type='virtio' name='{RELAY_PORT}'/></channel>\
         <channel type='file'><source path='{}'/><target type='virtio' name='{LOG_PORT}'/></channel>",
        esc(root),
        pci(2),
        pci(4),
        pci(5),
        esc(path_text("console", &spec.console_log)?),
        esc(path_text("relay socket", relay_socket)?),
        esc(path_text("level log", &spec.level_log)?),
    );
    for (i, d) in scsi.iter().enumerate() {
        let a = d.address;
        let _ = write!(
            x,
            "<hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host{}'/>\
             <address bus='{}' target='{}' unit='{}'/></source>\
             <address type='drive' controller='0' bus='0' target='{i}' unit='0'/></hostdev>",
            a.host, a.channel, a.target, a.lun
        );
    }
    x.push_str("<memballoon model='none'/></devices>");
    if let Some(key) = &spec.host_key {
        let _ = write!(
            x,
            "<sysinfo type='fwcfg'><entry name='{HOST_KEY_FW_CFG}' file='{}'/></sysinfo>",
            esc(path_text("host key", key)?)
        );
    }
    let _ = write!(
        x,
        "<qemu:commandline><qemu:arg value='-netdev'/>\
         <qemu:arg value='user,id=mtrnet,restrict=on,hostfwd=tcp:127.0.0.1:{}-:22'/>\
         <qemu:arg value='-device'/><qemu:arg value='virtio-net-pci,netdev=mtrnet,bus=pcie.0,addr=0x3'/>\
         </qemu:commandline></domain>",
        spec.ssh_port
    );
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MachineSpec {
        MachineSpec {
            arch: Arch::X86_64,
            accel: Accel::Kvm,
            memory_mib: 1024,
            cpus: 1,
            kernel: "/img/kernel".into(),
            initrd: "/run/a&b/initrd".into(),
            root: "/img/root.img".into(),
            root_direct: true,
            bundle: None,
            append: vec!["level=2".into()],
            ssh_port: 40100,
            console_log: "/run/L2.console".into(),
            monitor: None,
            relay_fd: -1,
            level_log: "/run/L2.log".into(),
            qmp_fd: None,
            scsi: Vec::new(),
            host_key: Some("/run/L2.hostkey".into()),
            sandbox: false,
            incoming_fd: None,
            append_files: false,
        }
    }

    #[test]
    fn the_domain_carries_the_level_with_its_relay_and_passed_disks() {
        let disk = Device {
            address: crate::scsi::Address {
                host: 2,
                channel: 0,
                target: 1,
                lun: 0,
            },
            ..Device::default()
        };
        let xml = domain_xml(
            &spec(),
            "matryoshka-L0-L1-L2",
            Path::new("/tmp/r/relay.sock"),
            &[disk],
        )
        .expect("xml");
        for needle in [
            "<domain type='kvm'",
            "<name>matryoshka-L0-L1-L2</name>",
            "<initrd>/run/a&amp;b/initrd</initrd>",
            "pci=lastbus=0",
            "level=2",
            "matryoshka.hostkey=fw_cfg",
            "<source mode='connect' path='/tmp/r/relay.sock'/><target type='virtio' name='org.matryoshka.relay'/>",
            "<channel type='file'><source path='/run/L2.log'/><target type='virtio' name='org.matryoshka.log'/>",
            "<adapter name='scsi_host2'/><address bus='0' target='1' unit='0'/>",
            "<entry name='opt/org.matryoshka/hostkey' file='/run/L2.hostkey'/>",
            "restrict=on,hostfwd=tcp:127.0.0.1:40100-:22",
            "<cpu mode='host-passthrough'/>",
        ] {
            assert!(xml.contains(needle), "no {needle} in {xml}");
        }
        let mut tcg = spec();
        tcg.accel = Accel::Tcg;
        tcg.kernel = "img/kernel".into();
        assert!(domain_xml(&tcg, "x", Path::new("/r"), &[]).is_err());
        tcg.kernel = "/img/kernel".into();
        let xml = domain_xml(&tcg, "x", Path::new("/r"), &[]).expect("xml");
        assert!(xml.contains("<domain type='qemu'") && xml.contains("<cpu mode='maximum'/>"));
    }

    #[test]
    fn names_are_unique_per_level_and_runtime() {
        let a = domain_name("L0/L1");
        let b = domain_name("L0/L1");
        assert!(a.starts_with("matryoshka-L0-L1-"), "{a}");
        assert_ne!(a, b);
    }
}
