//! QMP from L0 on the QEMU that runs L1: status, a disk hot-plugged onto L1's
//! SCSI controller and seen by L1's kernel, its removal and `DEVICE_DELETED`.
//!
//! Grants: `nest`, `qmp` (or `qmp=query-status,blockdev-add,device_add,device_del,blockdev-del`),
//! `passthrough` (L1 lists its SCSI devices to see the disk arrive).
//! `qmp_command_not_granted` expects `--grant qmp=query-status` only.

use std::time::{Duration, Instant};

use matryoshka_guest::ErrorKind;
use matryoshka_guest::host::{self, Error};
use matryoshka_guest::nest::{Backend, Guest, Vm};
use matryoshka_guest::passthrough;
use serde_json::json;

/// Model the hot-plugged disk reports.
const MODEL: &str = "HOTPLUG0";

/// At this level: waits until a SCSI disk of model `model` is there (`present`)
/// or gone, polling sysfs until `deadline_ms`; returns how long it took, ms.
fn wait_for_disk((model, present, deadline_ms): (String, bool, u64)) -> Result<u64, Error> {
    let started = Instant::now();
    loop {
        let there = passthrough::list_scsi()?
            .iter()
            .any(|d| d.model == model && d.block_node.is_some());
        if there == present {
            return Ok(started.elapsed().as_millis() as u64);
        }
        if started.elapsed() > Duration::from_millis(deadline_ms) {
            return Err(Error {
                kind: ErrorKind::Timeout,
                message: format!(
                    "the disk {model} did not {} within {deadline_ms} ms",
                    if present { "appear" } else { "go" }
                ),
                level_path: host::level_path(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn query_status_on_l1() -> Result<(), Error> {
    let l1 = Guest::boot(&Vm::new())?;
    let status = l1.qmp("query-status", serde_json::Value::Null)?;
    log::info!("{}: query-status {status}", l1.level_path());
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["running"], true, "{status}");
    // The round trip, for docs/benchmarks.md.
    let mut took: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            l1.qmp("query-status", serde_json::Value::Null)
                .map(|_| t.elapsed())
        })
        .collect::<Result<_, _>>()?;
    took.sort();
    log::info!(
        "QMP round trip to {} over 200 calls: median {} us, p99 {} us",
        l1.level_path(),
        took[100].as_micros(),
        took[198].as_micros()
    );
    // An unknown command is QEMU's error, as invalid-argument.
    let err = l1
        .qmp("no-such-command", serde_json::Value::Null)
        .expect_err("an unknown command fails");
    assert_eq!(err.kind, ErrorKind::InvalidArgument, "{err}");
    assert!(err.message.contains("CommandNotFound"), "{err}");
    Ok(())
}

fn disk_hotplug_through_qmp() -> Result<(), Error> {
    let l1 = Guest::boot(&Vm::new())?;
    let path = l1.level_path();
    l1.qmp(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "hp0", "size": 16 << 20, "read-zeroes": true}),
    )?;
    let added = Instant::now();
    l1.qmp(
        "device_add",
        json!({"driver": "scsi-hd", "id": "hp0dev", "drive": "hp0", "bus": "scsi0.0",
               "scsi-id": 7, "lun": 0, "product": MODEL}),
    )?;
    let seen_ms: u64 = l1.call("wait_for_disk", &(MODEL.to_string(), true, 60_000u64))?;
    log::info!(
        "{path}: hot-plugged disk seen by its kernel {} ms after device_add returned ({} ms in all)",
        seen_ms,
        added.elapsed().as_millis()
    );
    l1.qmp("device_del", json!({"id": "hp0dev"}))?;
    let event = l1.wait_qmp_event("DEVICE_DELETED", Duration::from_secs(60))?;
    log::info!("{path}: {event}");
    // The first DEVICE_DELETED may be for the device's inner parts; find ours.
    let mut event = event;
    while event["data"]["device"] != "hp0dev" {
        event = l1.wait_qmp_event("DEVICE_DELETED", Duration::from_secs(60))?;
    }
    let gone_ms: u64 = l1.call("wait_for_disk", &(MODEL.to_string(), false, 60_000u64))?;
    log::info!("{path}: the disk left its kernel {gone_ms} ms after DEVICE_DELETED");
    l1.qmp("blockdev-del", json!({"node-name": "hp0"}))?;
    Ok(())
}

/// At L1: boots L2 as a libvirt domain and asks its QEMU's status through QMP
/// (libvirt passes the command on); events are not available there.
fn status_of_a_libvirt_level(_: ()) -> Result<String, Error> {
    let l2 = Guest::boot(&Vm::new().backend(Backend::Libvirt))?;
    let status = l2.qmp("query-status", serde_json::Value::Null)?;
    assert_eq!(status["status"], "running", "{status}");
    let err = l2
        .wait_qmp_event("RESUME", Duration::from_secs(1))
        .expect_err("no events from a libvirt level");
    assert_eq!(err.kind, ErrorKind::Unsupported, "{err}");
    Ok(format!("{}: query-status {status}; {err}", l2.level_path()))
}

/// QMP on a level booted by libvirt, from the level that booted it (L1).
/// Needs `--grant libvirt` besides; ignored unless asked for.
fn qmp_through_libvirt() -> Result<(), Error> {
    let l1 = Guest::boot(&Vm::new())?;
    let said: String = l1.call("status_of_a_libvirt_level", &())?;
    log::info!("{said}");
    Ok(())
}

/// With `--grant qmp=query-status` only, other commands are refused here,
/// before QEMU sees them.
fn qmp_command_not_granted() -> Result<(), Error> {
    let l1 = Guest::boot(&Vm::new())?;
    l1.qmp("query-status", serde_json::Value::Null)?;
    let err = l1
        .qmp("device_del", json!({"id": "x"}))
        .expect_err("device_del is not granted");
    log::info!("{err}");
    assert_eq!(err.kind, ErrorKind::Denied, "{err}");
    assert!(err.message.contains("--grant qmp=device_del"), "{err}");
    Ok(())
}

matryoshka_guest::suite! {
    tests: [
        #[timeout_ms(600_000)] query_status_on_l1,
        #[timeout_ms(600_000)] disk_hotplug_through_qmp,
        #[ignore] #[timeout_ms(600_000)] qmp_command_not_granted,
        #[ignore] #[timeout_ms(600_000)] qmp_through_libvirt,
    ],
    remote: [wait_for_disk, status_of_a_libvirt_level],
}
