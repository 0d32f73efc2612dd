//! Against a real QEMU (`qemu-system-x86_64`).

use super::*;

/// A QEMU with a QMP socket, killed when this is dropped.
struct Qemu {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Qemu {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }
}

/// Starts `qemu-system-x86_64` with `args` and connects to its QMP socket.
async fn qemu(args: &[&str]) -> (Qemu, Qmp) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("q.sock");
    let log = std::fs::File::create(dir.path().join("qemu.log")).expect("log");
    let child = tokio::process::Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(args)
        .arg("-chardev")
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            socket.display()
        ))
        .args(["-mon", "chardev=qmp,mode=control"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-system-x86_64 (install qemu-system-x86)");
    let qemu = Qemu { child, dir };
    match Qmp::connect(&socket, LONG).await {
        Ok(qmp) => (qemu, qmp),
        Err(e) => panic!("QMP connect: {e}\nQEMU said: {}", qemu.log()),
    }
}

const NONE: &[&str] = &["-machine", "none"];

#[tokio::test]
async fn qemu_greets_with_its_version_and_answers_query_status() {
    let (_qemu, qmp) = qemu(NONE).await;
    let output = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .expect("qemu --version");
    let banner = String::from_utf8_lossy(&output.stdout);
    assert!(
        banner.contains(&format!("version {}", qmp.qemu_version())),
        "{} vs {banner}",
        qmp.qemu_version()
    );
    let status = qmp
        .execute("query-status", None, LONG)
        .await
        .expect("status");
    assert_eq!(status["status"], "running", "{status}");
    let version = qmp
        .execute("query-version", None, LONG)
        .await
        .expect("version");
    let q = &version["qemu"];
    assert_eq!(
        format!("{}.{}.{}", q["major"], q["minor"], q["micro"]),
        qmp.qemu_version()
    );
}

#[tokio::test]
async fn qemu_refuses_unknown_commands_and_bad_arguments() {
    let (_qemu, qmp) = qemu(NONE).await;
    let unknown = qmp.execute("no-such-command", None, LONG).await;
    assert!(
        matches!(&unknown, Err(QmpError::Qemu { class, desc }) if class == "CommandNotFound" && desc.contains("no-such-command")),
        "{unknown:?}"
    );
    let bad = qmp
        .execute("query-status", Some(json!({"x": 1})), LONG)
        .await;
    assert!(
        matches!(&bad, Err(QmpError::Qemu { class, .. }) if class == "GenericError"),
        "{bad:?}"
    );
    // Arguments that are not an object are QEMU's to refuse, with our id kept.
    let not_object = qmp.execute("query-status", Some(json!([1])), LONG).await;
    assert!(
        matches!(&not_object, Err(QmpError::Qemu { desc, .. }) if desc.contains("must be an object")),
        "{not_object:?}"
    );
    assert_eq!(qmp.pending_len(), 0);
    assert!(qmp.execute("query-status", None, LONG).await.is_ok());
}

#[tokio::test]
async fn qemu_object_add_and_del() {
    let (_qemu, qmp) = qemu(NONE).await;
    let objects = async || {
        let list = qmp
            .execute("qom-list", Some(json!({"path": "/objects"})), LONG)
            .await
            .expect("qom-list");
        list.as_array()
            .expect("an array")
            .iter()
            .filter_map(|p| p["name"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    let add = json!({"qom-type": "memory-backend-ram", "id": "mem1", "size": 1 << 20});
    assert_eq!(
        qmp.execute("object-add", Some(add.clone()), LONG).await,
        Ok(json!({}))
    );
    assert!(objects().await.contains(&"mem1".to_string()));
    let twice = qmp.execute("object-add", Some(add), LONG).await;
    assert!(
        matches!(&twice, Err(QmpError::Qemu { class, .. }) if class == "GenericError"),
        "{twice:?}"
    );
    let del = json!({"id": "mem1"});
    assert_eq!(
        qmp.execute("object-del", Some(del.clone()), LONG).await,
        Ok(json!({}))
    );
    assert!(!objects().await.contains(&"mem1".to_string()));
    let gone = qmp.execute("object-del", Some(del), LONG).await;
    assert!(
        matches!(&gone, Err(QmpError::Qemu { desc, .. }) if desc.contains("not found")),
        "{gone:?}"
    );
}

#[tokio::test]
async fn qemu_stop_and_cont_give_stop_and_resume_events() {
    let (_qemu, qmp) = qemu(NONE).await;
    assert_eq!(qmp.execute("stop", None, LONG).await, Ok(json!({})));
    let stop = qmp.wait_event("STOP", LONG).await.expect("STOP");
    assert_eq!(stop["event"], "STOP");
    assert!(stop["timestamp"]["seconds"].is_u64(), "{stop}");
    assert!(stop["timestamp"]["microseconds"].is_u64(), "{stop}");
    let status = qmp
        .execute("query-status", None, LONG)
        .await
        .expect("status");
    assert_eq!(status["status"], "paused");
    assert_eq!(qmp.execute("cont", None, LONG).await, Ok(json!({})));
    let resume = qmp.wait_event("RESUME", LONG).await.expect("RESUME");
    assert_eq!(resume["event"], "RESUME");
    let status = qmp
        .execute("query-status", None, LONG)
        .await
        .expect("status");
    assert_eq!(status["status"], "running");
}

/// Takes DEVICE_DELETED events until the one for `device`; returns those seen.
async fn deleted(qmp: &Qmp, device: &str, deadline: Duration) -> Result<Vec<Value>, QmpError> {
    let until = Instant::now() + deadline;
    let mut seen = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let event = qmp.wait_event("DEVICE_DELETED", left).await?;
        let done = event["data"]["device"] == device;
        seen.push(event);
        if done {
            return Ok(seen);
        }
    }
}

async fn peripherals(qmp: &Qmp) -> Vec<String> {
    let list = qmp
        .execute(
            "qom-list",
            Some(json!({"path": "/machine/peripheral"})),
            LONG,
        )
        .await
        .expect("qom-list");
    list.as_array()
        .expect("an array")
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

async fn add_null_drive(qmp: &Qmp, node: &str) {
    let drive = json!({"driver": "null-co", "node-name": node, "size": 1 << 20});
    assert_eq!(
        qmp.execute("blockdev-add", Some(drive), LONG).await,
        Ok(json!({}))
    );
}

/// Adds a null drive `disk1` and `device` (id `id`) on it, then deletes the
/// device; returns the `DEVICE_DELETED` events up to the one for `id`.
async fn plug_and_unplug(qmp: &Qmp, device: Value, id: &str) -> Vec<Value> {
    add_null_drive(qmp, "disk1").await;
    assert_eq!(
        qmp.execute("device_add", Some(device), LONG).await,
        Ok(json!({}))
    );
    assert!(peripherals(qmp).await.contains(&id.to_string()));
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": id})), LONG)
            .await,
        Ok(json!({}))
    );
    deleted(qmp, id, LONG).await.expect("DEVICE_DELETED")
}

#[tokio::test]
async fn qemu_scsi_disk_hot_plug_cycle_gives_device_deleted() {
    let (_qemu, qmp) = qemu(&[
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-S",
        "-device",
        "virtio-scsi-pci,id=scsi0",
    ])
    .await;
    let device = json!({"driver": "scsi-hd", "drive": "disk1", "id": "sd1", "bus": "scsi0.0"});
    let events = plug_and_unplug(&qmp, device, "sd1").await;
    let last = events.last().expect("one");
    assert_eq!(last["data"]["path"], "/machine/peripheral/sd1");
    assert!(!peripherals(&qmp).await.contains(&"sd1".to_string()));
    assert_eq!(
        qmp.execute("blockdev-del", Some(json!({"node-name": "disk1"})), LONG)
            .await,
        Ok(json!({}))
    );
}

/// On q35 with native PCIe hot-plug (ACPI hot-plug of bridges off), a device in a
/// root port whose slot no guest ever powered is unplugged at once.
#[tokio::test]
async fn qemu_virtio_blk_pci_hot_plug_cycle_on_native_pcie() {
    let (_qemu, qmp) = qemu(&[
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-S",
        "-global",
        "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
        "-device",
        "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
    ])
    .await;
    let device = json!({"driver": "virtio-blk-pci", "drive": "disk1", "id": "vb1", "bus": "rp1"});
    let events = plug_and_unplug(&qmp, device, "vb1").await;
    // QEMU 7.2 first reports the virtio backend child, without a "device" member.
    assert!(
        events
            .iter()
            .any(|e| e["data"]["path"] == "/machine/peripheral/vb1/virtio-backend"),
        "{events:?}"
    );
    assert!(!peripherals(&qmp).await.contains(&"vb1".to_string()));
}

/// With q35's default ACPI hot-plug, unplugging waits for the guest's ACPI to eject
/// the device: without a guest OS, DEVICE_DELETED never comes.
#[tokio::test]
async fn qemu_acpi_hot_unplug_without_a_guest_never_completes() {
    let (_qemu, qmp) = qemu(&[
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-device",
        "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
    ])
    .await;
    add_null_drive(&qmp, "disk1").await;
    let device = json!({"driver": "virtio-blk-pci", "drive": "disk1", "id": "vb1", "bus": "rp1"});
    assert_eq!(
        qmp.execute("device_add", Some(device), LONG).await,
        Ok(json!({}))
    );
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "vb1"})), LONG)
            .await,
        Ok(json!({}))
    );
    let waited = deleted(&qmp, "vb1", Duration::from_millis(1500)).await;
    assert!(
        matches!(&waited, Err(QmpError::Timeout(m)) if m.contains("DEVICE_DELETED")),
        "{waited:?}"
    );
    assert!(peripherals(&qmp).await.contains(&"vb1".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_two_executes_at_once_get_their_own_replies() {
    let (_qemu, qmp) = qemu(NONE).await;
    let (status, version) = tokio::join!(
        qmp.execute("query-status", None, LONG),
        qmp.execute("query-version", None, LONG)
    );
    assert!(status.expect("status").get("status").is_some());
    assert!(version.expect("version").get("qemu").is_some());

    let qmp = Arc::new(qmp);
    let tasks: Vec<_> = (0..32)
        .map(|n| {
            let qmp = Arc::clone(&qmp);
            tokio::spawn(async move {
                if n % 2 == 0 {
                    let r = qmp.execute("query-status", None, LONG).await;
                    assert!(r.expect("status").get("status").is_some());
                } else {
                    let r = qmp.execute("query-version", None, LONG).await;
                    assert!(r.expect("version").get("qemu").is_some());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    assert_eq!(qmp.pending_len(), 0);
}

#[tokio::test]
async fn qemu_quit_gives_shutdown_then_closed() {
    let (mut qemu, qmp) = qemu(NONE).await;
    assert_eq!(qmp.execute("quit", None, LONG).await, Ok(json!({})));
    let status = tokio::time::timeout(LONG, qemu.child.wait())
        .await
        .expect("QEMU exits")
        .expect("wait");
    assert!(status.success(), "{status}");
    let shutdown = qmp.wait_event("SHUTDOWN", LONG).await.expect("SHUTDOWN");
    assert_eq!(shutdown["data"]["reason"], "host-qmp-quit", "{shutdown}");
    assert_eq!(
        qmp.execute("query-status", None, LONG).await,
        Err(QmpError::Closed)
    );
    assert_eq!(qmp.wait_event("STOP", LONG).await, Err(QmpError::Closed));
}

#[tokio::test]
async fn qemu_killed_while_a_call_waits_gives_closed() {
    let (mut qemu, qmp) = qemu(NONE).await;
    let (waited, ()) = tokio::join!(qmp.wait_event("NEVER", LONG), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        qemu.child.start_kill().expect("kill");
    });
    assert_eq!(waited, Err(QmpError::Closed));
}

/// QMP round trip of `query-status`; run with `--ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement; prints the numbers"]
async fn qemu_round_trip() {
    let (_qemu, qmp) = qemu(NONE).await;
    for _ in 0..50 {
        qmp.execute("query-status", None, LONG)
            .await
            .expect("warm up");
    }
    let mut micros = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let start = std::time::Instant::now();
        qmp.execute("query-status", None, LONG)
            .await
            .expect("status");
        micros.push(start.elapsed().as_micros());
    }
    micros.sort_unstable();
    println!(
        "QMP query-status round trip over {} calls: median {} µs, p99 {} µs, min {} µs, max {} µs",
        micros.len(),
        micros[micros.len() / 2],
        micros[micros.len() * 99 / 100],
        micros[0],
        micros[micros.len() - 1]
    );
}
