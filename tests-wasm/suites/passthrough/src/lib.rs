//! The passthrough demo: a SCSI disk made at one level and passed through to
//! the levels below, checked at each of them.
//!
//! At every level k from L1 down to the next-to-last, the component makes a
//! `scsi_debug` disk whose vendor and product name k (`MTRYL{k}`,
//! `DISK-L{k}`), boots level k+1 with that disk and every disk it received
//! itself passed through, and checks at k+1 that each one is there with its
//! vendor and model (from sysfs). Through each disk it writes a block at k+1
//! and reads it back at k, then the other way round, with direct I/O on both
//! sides: what k+1 sees is the very disk k holds. L0 starts the loop by booting
//! L1 (its kernel may have no modules; the machine this runs on here has none);
//! under `--levels N` the loop starts at LN.
//!
//! Environment (set with `--env`):
//! - `PASSTHROUGH_LEVELS`: the deepest level (default 2, at least 2);
//! - `PASSTHROUGH_BACKENDS`: what boots each level, a comma list from L1 down
//!   of `qemu` or `libvirt` (default `qemu` for all; the last entry repeats).
//!
//! Grants: `nest`, `passthrough`, `exec=dd`, and `libvirt` for that backend.

use matryoshka_guest::ErrorKind;
use matryoshka_guest::host::{self, Error};
use matryoshka_guest::nest::{Backend, Guest, Vm};
use matryoshka_guest::passthrough::{self, ScsiDevice};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Bytes of one block written through a disk.
const BLOCK: usize = 4096;

/// A disk as its maker describes it to the levels below.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Disk {
    vendor: String,
    model: String,
    /// The level that made it.
    made_at: u32,
}

/// What one level saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Seen {
    path: String,
    level: u32,
    /// `vendor model` of each received disk, with the driver that shows it.
    disks: Vec<String>,
    /// Blocks written at the level above and read here, and the other way round.
    round_trips: u32,
}

fn env_u32(name: &str) -> Option<u32> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn deepest() -> u32 {
    env_u32("PASSTHROUGH_LEVELS").unwrap_or(2).max(2)
}

/// What boots level `depth`.
fn backend_for(depth: u32) -> Backend {
    let list = std::env::var("PASSTHROUGH_BACKENDS").unwrap_or_default();
    let names: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let name = names
        .get(depth as usize - 1)
        .or(names.last())
        .copied()
        .unwrap_or("qemu");
    match name {
        "libvirt" => Backend::Libvirt,
        _ => Backend::Qemu,
    }
}

fn fail(message: String) -> Error {
    Error {
        kind: ErrorKind::NotFound,
        message,
        level_path: host::level_path(),
    }
}

/// The device with `disk`'s vendor and model at this level.
fn find(disk: &Disk) -> Result<ScsiDevice, Error> {
    let all = passthrough::list_scsi()?;
    all.iter()
        .find(|d| d.vendor == disk.vendor && d.model == disk.model)
        .cloned()
        .ok_or_else(|| {
            let have: Vec<String> = all
                .iter()
                .map(|d| format!("{} {} {} ({})", d.address, d.vendor, d.model, d.host_driver))
                .collect();
            fail(format!(
                "no SCSI device {} {} (made at L{}) here; this level has: {}",
                disk.vendor,
                disk.model,
                disk.made_at,
                have.join("; ")
            ))
        })
}

fn block_node(device: &ScsiDevice) -> Result<String, Error> {
    device.block_node.clone().ok_or_else(|| {
        fail(format!(
            "{} {} has no block node",
            device.vendor, device.model
        ))
    })
}

/// The block of `BLOCK` bytes a level writes at `offset` (in blocks).
fn pattern(writer: &str, disk: &Disk, offset: u32) -> Vec<u8> {
    let text = format!(
        "{writer} wrote this block {offset} of {} {}\n",
        disk.vendor, disk.model
    );
    text.bytes().cycle().take(BLOCK).collect()
}

/// Writes `data` at block `offset` of `disk` here, bypassing the page cache.
fn write_block(disk: &Disk, offset: u32, data: &[u8]) -> Result<(), Error> {
    let node = block_node(&find(disk)?)?;
    let out = host::exec_with_stdin(
        &[
            "dd".to_string(),
            format!("of={node}"),
            format!("bs={BLOCK}"),
            "count=1".into(),
            format!("seek={offset}"),
            "oflag=direct".into(),
            "conv=notrunc,fsync".into(),
            "status=none".into(),
        ],
        data,
    )?;
    if !out.success() {
        return Err(fail(format!("dd to {node}: {}", out.stderr_lossy().trim())));
    }
    Ok(())
}

/// Reads block `offset` of `disk` here, bypassing the page cache.
fn read_block(disk: &Disk, offset: u32) -> Result<Vec<u8>, Error> {
    let node = block_node(&find(disk)?)?;
    let out = host::exec(&[
        "dd".to_string(),
        format!("if={node}"),
        format!("bs={BLOCK}"),
        "count=1".into(),
        format!("skip={offset}"),
        "iflag=direct".into(),
        "status=none".into(),
    ])?;
    if !out.success() {
        return Err(fail(format!(
            "dd from {node}: {}",
            out.stderr_lossy().trim()
        )));
    }
    Ok(out.stdout)
}

// ---- remote functions ----

/// Writes the block `(disk, offset)` with this level's pattern.
fn write_here((disk, offset): (Disk, u32)) -> Result<(), Error> {
    write_block(&disk, offset, &pattern(&host::level_path(), &disk, offset))
}

/// Reads the block `(disk, offset)`.
fn read_here((disk, offset): (Disk, u32)) -> Result<Vec<u8>, Error> {
    read_block(&disk, offset)
}

/// At level k: checks the disks received from above, then (above the deepest
/// level) makes its own, boots k+1 with all of them and checks each through it.
fn hop(received: Vec<Disk>) -> Result<Vec<Seen>, Error> {
    let level = host::level();
    let path = host::level_path();
    let mut me = Seen {
        path: path.clone(),
        level,
        disks: Vec::new(),
        round_trips: 0,
    };
    for disk in &received {
        let d = find(disk)?;
        log::info!(
            "{path}: {} {} is here as {} ({})",
            d.vendor,
            d.model,
            d.address,
            d.host_driver
        );
        me.disks
            .push(format!("{} {} via {}", d.vendor, d.model, d.host_driver));
    }
    if level >= deepest() {
        return Ok(vec![me]);
    }
    // Made first, so it is dropped (unloaded) after the level it is passed to.
    let own = passthrough::scsi_debug()
        .vendor(&format!("MTRYL{level}"))
        .product(&format!("DISK-L{level}"))
        .size_mib(16)
        .create()?;
    let dev = own.device()?;
    log::info!(
        "{path}: made {} {} at {} ({:?}, {:?})",
        dev.vendor,
        dev.model,
        dev.address,
        dev.block_node,
        dev.generic_node
    );
    let mine = Disk {
        vendor: dev.vendor.clone(),
        model: dev.model.clone(),
        made_at: level,
    };
    let mut passing = received.clone();
    passing.push(mine);
    let mut vm = Vm::new().backend(backend_for(level + 1));
    for disk in &passing {
        vm = vm.scsi(find(disk)?.address);
    }
    log::info!(
        "{path}: booting L{} with {} disk(s) passed through",
        level + 1,
        passing.len()
    );
    let below = Guest::boot(&vm)?;
    let mut seen: Vec<Seen> = below.call("hop", &passing)?;
    // Each disk, both ways: written below and read here, written here and read below.
    for (i, disk) in passing.iter().enumerate() {
        let down = 2 * i as u32 + 1;
        below.call::<_, ()>("write_here", &(disk.clone(), down))?;
        let got = read_block(disk, down)?;
        let want = pattern(&below.level_path(), disk, down);
        assert!(
            got == want,
            "{path}: block {down} of {} {} is not what {} wrote: {:?}",
            disk.vendor,
            disk.model,
            below.level_path(),
            String::from_utf8_lossy(&got[..80.min(got.len())])
        );
        let up = down + 1;
        write_block(disk, up, &pattern(&path, disk, up))?;
        let got: Vec<u8> = below.call("read_here", &(disk.clone(), up))?;
        assert!(
            got == pattern(&path, disk, up),
            "{}: block {up} of {} {} is not what {path} wrote",
            below.level_path(),
            disk.vendor,
            disk.model
        );
        if let Some(s) = seen.first_mut() {
            s.round_trips += 2;
        }
    }
    // The level below goes first, then the disk: nothing of scsi_debug stays here.
    drop(below);
    drop(own);
    let left: Vec<String> = passthrough::list_scsi()?
        .into_iter()
        .filter(|d| d.host_driver == "scsi_debug")
        .map(|d| format!("{} {} {}", d.address, d.vendor, d.model))
        .collect();
    assert!(
        left.is_empty(),
        "{path}: scsi_debug disks left after the test: {left:?}"
    );
    let mut all = vec![me];
    all.append(&mut seen);
    Ok(all)
}

/// Makes a disk, boots the next level with it, and panics while holding both:
/// the instance's teardown must stop the level before it unloads the disk.
fn hold_and_fail(_: ()) -> Result<(), Error> {
    let disk = passthrough::scsi_debug()
        .vendor("HOLDING")
        .size_mib(8)
        .create()?;
    let address = disk.device()?.address;
    // An L2 boot lost to nested SVM under TCG stalls silently: give up well
    // before the default so a retry still fits in the test's time.
    let below = Guest::boot(
        &Vm::new()
            .scsi(address)
            .boot_timeout(Duration::from_secs(150)),
    )?;
    log::info!(
        "{}: booted with {address} passed through",
        below.level_path()
    );
    panic!(
        "deliberately, while holding {address} and {}",
        below.level_path()
    );
}

/// The `scsi_debug` disks left at this level, after making (and dropping) a new
/// one to show the level can: `[]` when the last instance cleaned up.
fn scsi_debug_left(_: ()) -> Result<Vec<String>, Error> {
    let left: Vec<String> = passthrough::list_scsi()?
        .into_iter()
        .filter(|d| d.host_driver == "scsi_debug")
        .map(|d| format!("{} {} {}", d.address, d.vendor, d.model))
        .collect();
    drop(passthrough::scsi_debug().size_mib(8).create()?);
    Ok(left)
}

// ---- tests ----

/// The loop from where the test starts: at L0 it boots L1 first (L0 may have
/// no modules); under `--levels N` it starts at LN. Every level below the first
/// must have received one disk from each level above it, from the first on.
fn disk_passed_to_level_n() -> Result<(), Error> {
    let n = deepest();
    let start = host::level();
    let first = start.max(1);
    let seen: Vec<Seen> = if start == 0 {
        let l1 = Guest::boot(&Vm::new().backend(backend_for(1)))?;
        l1.call("hop", &Vec::<Disk>::new())?
    } else {
        hop(Vec::new())?
    };
    assert_eq!(
        seen.len() as u32,
        n.max(first) - first + 1,
        "one report per level from L{first} to L{n}: {seen:?}"
    );
    for s in &seen {
        log::info!(
            "{}: received {:?}, {} blocks checked both ways",
            s.path,
            s.disks,
            s.round_trips
        );
        let expected: Vec<String> = (first..s.level)
            .map(|k| format!("MTRYL{k} DISK-L{k}"))
            .collect();
        let got: Vec<String> = s
            .disks
            .iter()
            .map(|d| d.split(" via ").next().unwrap_or_default().to_string())
            .collect();
        assert_eq!(got, expected, "{}: the disks received", s.path);
        if s.level > first {
            assert!(
                s.disks.iter().all(|d| d.ends_with("via virtio_scsi")),
                "{:?}",
                s.disks
            );
            assert_eq!(s.round_trips, 2 * (s.level - first), "{}", s.path);
        }
    }
    Ok(())
}

/// A call that fails while holding a disk and the level it was passed to: the
/// level goes, then the disk, and the next instance makes a disk again.
fn a_failed_call_leaves_no_disk_behind() -> Result<(), Error> {
    let l1 = Guest::boot(&Vm::new())?;
    let err = l1
        .call::<_, ()>("hold_and_fail", &())
        .expect_err("the call panics");
    log::info!("{err}");
    let left: Vec<String> = l1.call("scsi_debug_left", &())?;
    assert!(
        left.is_empty(),
        "{}: left behind: {left:?}",
        l1.level_path()
    );
    // Only the deliberate panic shows what this test is about: a level below
    // that never served is this test failing (and being retried), not passing.
    if !err.message.contains("deliberately, while holding") {
        return Err(err);
    }
    Ok(())
}

/// Making a disk where the kernel cannot load modules is `unsupported` with a
/// message that says where it can be done. Ignored unless asked for: run it
/// only on a machine whose kernel has no module support.
fn scsi_debug_needs_module_support() -> Result<(), Error> {
    match passthrough::scsi_debug().create() {
        Err(e) => {
            log::info!("{e}");
            assert_eq!(e.kind, ErrorKind::Unsupported, "{e}");
            assert!(e.message.contains("VM level"), "{e}");
            Ok(())
        }
        Ok(disk) => panic!("a scsi_debug disk was made at L0: {:?}", disk.device()),
    }
}

/// Passing a device this level does not have fails before anything boots.
fn passing_a_missing_device_is_refused() -> Result<(), Error> {
    let missing = passthrough::ScsiAddress {
        host: 99,
        channel: 0,
        target: 0,
        lun: 0,
    };
    match Guest::boot(&Vm::new().scsi(missing)) {
        Err(e) => {
            log::info!("{e}");
            assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
            assert!(e.message.contains("99:0:0:0"), "{e}");
            Ok(())
        }
        Ok(g) => panic!(
            "{} booted with a device that does not exist",
            g.level_path()
        ),
    }
}

matryoshka_guest::suite! {
    tests: [
        #[timeout_ms(1_800_000)] disk_passed_to_level_n,
        #[ignore] scsi_debug_needs_module_support,
        #[timeout_ms(600_000)] a_failed_call_leaves_no_disk_behind,
        passing_a_missing_device_is_refused,
    ],
    remote: [hop, write_here, read_here, hold_and_fail, scsi_debug_left],
}
