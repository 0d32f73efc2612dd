//! The nested demo: a loop that boots guests from one shared image up to level N.
//!
//! At each level the same component boots the next guest (the image that level
//! itself booted from), calls itself there, and checks what the level below says
//! about itself against what its runtime reported when booting it. The deepest
//! level checksums the read-only root it was handed, which L0 compares with the
//! image file.
//!
//! Environment (set with `--env`):
//! - `NESTED_LEVELS`: depth of the chain (default 2);
//! - `NESTED_ARCHS`: the architecture of each level from L1 down (`s390x`, or
//!   `x86_64,s390x`); a level past the list is of its parent's. Every level
//!   answers with its architecture and the sha256 of the component it runs;
//! - `NESTED_ROOT`: the deepest level's image root at L0 (default
//!   `target/images/<its arch>/root.img`);
//! - `NESTED_MEMORY_MIB`, `NESTED_BOOT_TIMEOUT_MS`, `NESTED_IMAGE`: passed to
//!   every boot, for tests of boot failures and refusals;
//! - `NESTED_ROUND_TRIPS`: that many no-op calls from each level to the one it
//!   booted, timed, for docs/benchmarks.md (default none);
//! - `NESTED_PARENT_PORT`: the port on L0's 127.0.0.1 that `sealed_level` tries
//!   to reach from L1 (needs `--grant exec=timeout,ssh-keyscan`).

use std::time::Duration;

use matryoshka_guest::host::{self, Error};
use matryoshka_guest::nest::{Guest, Vm};
use serde::{Deserialize, Serialize};

/// What one level says about itself, and what its parent said about it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Level {
    level: u32,
    path: String,
    hostname: String,
    /// `uname -m` of the level, from its runtime.
    arch: String,
    /// The architecture its parent's runtime reported for it.
    reported_arch: Option<String>,
    /// sha256 of the component, computed by the level's runtime.
    component_sha256: String,
    /// `level=N accel=… kvm=…`, written by the level's init from what its kernel saw
    /// (`kvm=loading` until its KVM modules are in).
    seen: String,
    /// The accelerator the parent's runtime booted it with.
    reported_accel: Option<String>,
    /// sha256 of `/dev/vda`, at the deepest level only.
    root_sha256: Option<String>,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn levels() -> u32 {
    env_u64("NESTED_LEVELS").map_or(2, |n| n as u32)
}

/// The architecture `NESTED_ARCHS` names for level `depth`, if it names one.
fn arch_of(depth: u32) -> Option<String> {
    let archs = std::env::var("NESTED_ARCHS").unwrap_or_default();
    archs
        .split(',')
        .filter(|a| !a.is_empty())
        .nth(depth.checked_sub(1)? as usize)
        .map(str::to_string)
}

/// The boot of level `depth`.
fn vm(depth: u32) -> Vm {
    let mut vm = Vm::new();
    if let Some(arch) = arch_of(depth) {
        vm = vm.arch(&arch);
    }
    if let Some(mib) = env_u64("NESTED_MEMORY_MIB") {
        vm = vm.memory_mib(mib as u32);
    }
    if let Some(ms) = env_u64("NESTED_BOOT_TIMEOUT_MS") {
        vm = vm.boot_timeout(Duration::from_millis(ms));
    }
    if let Ok(dir) = std::env::var("NESTED_IMAGE") {
        vm = vm.image(&dir);
    }
    vm
}

fn run(argv: &[&str]) -> Result<String, Error> {
    Ok(host::check_output(argv)?.trim().to_string())
}

fn sha256_of(path: &str) -> Result<String, Error> {
    let out = run(&["sha256sum", path])?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn here() -> Result<Level, Error> {
    let level = host::level();
    Ok(Level {
        level,
        path: host::level_path(),
        hostname: host::hostname(),
        arch: host::arch(),
        reported_arch: None,
        component_sha256: host::component_sha256(),
        seen: if level == 0 {
            String::new()
        } else {
            run(&["cat", "/run/matryoshka/level"])?
        },
        reported_accel: None,
        root_sha256: None,
    })
}

/// RSS of this level's runtime and QEMU processes, from `ps`.
fn resident() -> Result<String, Error> {
    let table = run(&["ps", "-eo", "rss=,comm="])?;
    let mut parts = Vec::new();
    for line in table.lines() {
        let mut words = line.split_whitespace();
        let (Some(rss), Some(comm)) = (words.next(), words.next()) else {
            continue;
        };
        let kib: u64 = rss.parse().unwrap_or(0);
        let runtime = comm.starts_with("matryoshka") && !comm.starts_with("matryoshka-leve");
        if comm.starts_with("qemu-system") || runtime {
            parts.push(format!("{comm} {} MiB", kib / 1024));
        }
    }
    Ok(parts.join(", "))
}

// ---- remote function: runs at every level ----

/// This level's facts, then, unless it is the deepest, the next level's: booted
/// here from the image this level came from.
fn descend(_: ()) -> Result<Vec<Level>, Error> {
    let mut me = here()?;
    if me.level > 0 {
        log::info!("{}: answering at level {}", me.path, me.level);
    }
    if me.level >= levels() {
        me.root_sha256 = Some(sha256_of("/dev/vda")?);
        return Ok(vec![me]);
    }
    log::info!("{}: booting level {}", me.path, me.level + 1);
    let guest = Guest::boot(&vm(me.level + 1))?;
    let mut below: Vec<Level> = guest.call("descend", &())?;
    if let Some(calls) = env_u64("NESTED_ROUND_TRIPS").filter(|&n| n > 0) {
        time_round_trips(&guest, calls as usize)?;
    }
    if let Some(child) = below.first_mut() {
        assert_eq!(
            child.level,
            guest.level(),
            "the level below says it is another depth"
        );
        child.reported_accel = guest.accel();
        child.reported_arch = Some(guest.arch());
    }
    // The level's init has loaded KVM by now (booting the child waited for it).
    if me.level > 0 {
        me.seen = run(&["cat", "/run/matryoshka/level"])?;
    }
    // While the level below is up: what its QEMU and this level's runtime hold.
    log::info!("{}: resident memory: {}", me.path, resident()?);
    log::info!(
        "{}: level {} answered; shutting it down",
        me.path,
        me.level + 1
    );
    let mut all = vec![me];
    all.append(&mut below);
    Ok(all)
}

/// Does nothing: the call whose round trip `NESTED_ROUND_TRIPS` times.
fn noop(_: ()) -> Result<(), Error> {
    Ok(())
}

/// `calls` no-op calls to `guest`, one after the other; logs their median and
/// 90th percentile.
fn time_round_trips(guest: &Guest, calls: usize) -> Result<(), Error> {
    let mut micros = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = std::time::Instant::now();
        guest.call::<_, ()>("noop", &())?;
        micros.push(t.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    log::info!(
        "{}: no-op round trip to {} ({}) over {calls} calls: median {:.0} us, p90 {:.0} us",
        host::level_path(),
        guest.level_path(),
        guest.arch(),
        micros[calls / 2],
        micros[calls * 9 / 10]
    );
    Ok(())
}

/// At a VM level: tries to open a TCP connection to its parent's
/// `127.0.0.1:<port>` through the user network's gateway, 10.0.2.2, and says
/// what happened (`connected …` or `connection … failed: …`).
fn reach_parent(port: u16) -> Result<String, Error> {
    let target = format!("10.0.2.2:{port}");
    let out = host::exec(&[
        "timeout",
        "20",
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/10.0.2.2/{port}"),
    ])?;
    Ok(if out.success() {
        format!("connected to {target}")
    } else {
        format!(
            "connection to {target} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

// ---- tests ----

/// The chain from where the test starts (L0, or LN under `--levels N`) down to
/// `NESTED_LEVELS`: one answer per level, each checked against what its parent saw.
fn nested_levels() -> Result<(), Error> {
    let n = levels();
    let start = host::level();
    let chain = descend(())?;
    assert_eq!(
        chain.len() as u32,
        n.max(start) - start + 1,
        "one answer per level from L{start} to L{n}: {chain:?}"
    );
    let top = &chain[0];
    for (i, l) in chain.iter().enumerate() {
        let depth = start + i as u32;
        assert_eq!(l.level, depth);
        // The same component everywhere, hashed by each level's own runtime.
        assert_eq!(
            l.component_sha256, top.component_sha256,
            "{}: another component than at {}",
            l.path, top.path
        );
        // Each level of the architecture asked for (else of its parent's).
        let parent_arch = chain[..i].last().map_or(&top.arch, |p| &p.arch);
        let expected_arch = arch_of(depth).unwrap_or_else(|| parent_arch.clone());
        if i > 0 {
            assert_eq!(l.arch, expected_arch, "{}: architecture", l.path);
            assert_eq!(
                l.reported_arch.as_deref(),
                Some(l.arch.as_str()),
                "{}: its parent saw another architecture",
                l.path
            );
        }
        log::info!(
            "{}: {}, component {}",
            l.path,
            l.arch,
            &l.component_sha256[..12.min(l.component_sha256.len())]
        );
        if depth == 0 {
            continue;
        }
        log::info!(
            "{}: hostname {}, {}, booted with {}",
            l.path,
            l.hostname,
            l.seen,
            l.reported_accel.as_deref().unwrap_or("?")
        );
        assert_eq!(l.hostname, format!("level-{depth}"));
        assert!(
            l.seen.starts_with(&format!("level={depth} ")),
            "{}: init says `{}`",
            l.path,
            l.seen
        );
        if i == 0 {
            // The level the test started at: its parent's report is not here.
            continue;
        }
        // The accelerator the parent chose is the one the level's kernel saw.
        let seen_accel = l
            .seen
            .split_whitespace()
            .find_map(|w| w.strip_prefix("accel="));
        assert_eq!(
            seen_accel,
            l.reported_accel.as_deref(),
            "{}: booted with {:?} but its kernel saw `{}`",
            l.path,
            l.reported_accel,
            l.seen
        );
    }
    let deepest = chain.last().expect("at least the first level");
    // The image's root: the file at L0, the root disk at a VM level.
    let root = if start == 0 {
        std::env::var("NESTED_ROOT")
            .unwrap_or_else(|_| format!("target/images/{}/root.img", deepest.arch))
    } else {
        "/dev/vda".to_string()
    };
    let expected = sha256_of(&root)?;
    assert_eq!(
        deepest.root_sha256.as_deref(),
        Some(expected.as_str()),
        "the root read at {} differs from {root}",
        deepest.path
    );
    Ok(())
}

/// `nested_levels` with an hour instead of fifteen minutes, for chains with an
/// emulated level under an emulated level (an s390x L2 under an x86_64 L1 that
/// itself runs under TCG: its kernel alone takes four to nine minutes to boot
/// here): run it with `--ignored`.
fn nested_levels_emulated_twice() -> Result<(), Error> {
    nested_levels()
}

/// Says where it runs; at a VM level, checks the host name and what the level's
/// init saw. With `--levels N` it runs at LN.
fn where_am_i() -> Result<(), Error> {
    let me = here()?;
    log::info!("running at {} on {} ({})", me.path, me.hostname, me.seen);
    if me.level > 0 {
        assert_eq!(me.hostname, format!("level-{}", me.level));
        assert!(
            me.seen.starts_with(&format!("level={} ", me.level)),
            "{}",
            me.seen
        );
    }
    Ok(())
}

/// The host key the sshd of the level behind `ssh_command` (`… -p PORT …`)
/// presents, asked through the forwarded port: `ssh-ed25519 AAAA…`.
fn host_key_behind(ssh_command: &str) -> Result<String, Error> {
    let port = ssh_command
        .split_whitespace()
        .skip_while(|w| *w != "-p")
        .nth(1)
        .unwrap_or_default();
    // The level starts sshd beside its runtime, at a low priority: give it time.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        let out = host::exec(&[
            "ssh-keyscan",
            "-T",
            "5",
            "-t",
            "ed25519",
            "-p",
            port,
            "127.0.0.1",
        ])?;
        let text = out.stdout_lossy();
        if let Some(key) = text.lines().find_map(|l| {
            let at = l.find("ssh-ed25519 ")?;
            Some(l[at..].trim().to_string())
        }) {
            return Ok(key);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Err(Error {
        kind: matryoshka_guest::ErrorKind::Timeout,
        message: format!("no ssh-ed25519 host key on 127.0.0.1:{port} within two minutes"),
        level_path: host::level_path(),
    })
}

/// Boots L1 and checks what it may reach: from L1, its parent's 127.0.0.1
/// (through 10.0.2.2) must be out of reach, while the parent still reaches
/// L1's sshd through the forwarded port. Logs the attempt and the host key
/// that sshd presents, for the runner's test to compare.
fn sealed_level() -> Result<(), Error> {
    let port = env_u64("NESTED_PARENT_PORT").expect("NESTED_PARENT_PORT is set") as u16;
    let guest = Guest::boot(&vm(host::level() + 1))?;
    let path = guest.level_path();
    let attempt: String = guest.call("reach_parent", &port)?;
    log::info!("{path}: {attempt}");
    assert!(
        attempt.starts_with("connection to"),
        "{path} reached its parent's 127.0.0.1:{port}: {attempt}"
    );
    let ssh = guest.ssh_command().expect("a VM level has an ssh command");
    log::info!("{path}: sshd host key {}", host_key_behind(&ssh)?);
    Ok(())
}

/// Makes this level's kernel print a backtrace of its CPUs (sysrq `l`: its
/// console shows `Call Trace:`) and ends 0.2 s later, before the level above
/// (which reads that console every 0.5 s) would next look: the read it makes
/// when a test ends charges the lines to this test. Ignored: run it with
/// `--levels 1 --grant exec=sh --ignored kernel_backtrace`.
fn kernel_backtrace() -> Result<(), Error> {
    run(&["sh", "-c", "echo l > /proc/sysrq-trigger"])?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    Ok(())
}

/// Leaves a mark in the level's `/tmp` (granted as `/scratch`: `--grant
/// fs=/tmp:/scratch:rw`) and fails when a mark is there already: the second of
/// `fresh_level_first` and `fresh_level_second` fails on a chain the tests
/// share, and neither on levels restored from a snapshot for each test
/// (`--levels N --snapshot`). Ignored: run both with `--ignored`.
fn fresh_level_first() -> std::io::Result<()> {
    leave_mark()
}

/// See [`fresh_level_first`].
fn fresh_level_second() -> std::io::Result<()> {
    leave_mark()
}

fn leave_mark() -> std::io::Result<()> {
    let mark = "/scratch/matryoshka-fresh-level.mark";
    if let Ok(by) = std::fs::read_to_string(mark) {
        panic!("{} is not fresh: {by} ran here before", host::level_path());
    }
    std::fs::write(mark, format!("a test at {}", host::level_path()))
}

/// Takes 10 s: a level restored after it has a snapshot 10 s older than L0's
/// clock, until its clock is set. Ignored: for the snapshot tests.
fn takes_ten_seconds() {
    std::thread::sleep(Duration::from_secs(10));
}

/// Prints the level's wall clock (`wall clock: <ms since the epoch>`), for a
/// level above to compare with its own. Ignored: for the snapshot tests.
fn prints_the_wall_clock() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    println!("wall clock: {now}");
}

matryoshka_guest::suite! {
    tests: [
        #[timeout_ms(900_000)]
        nested_levels,
        #[ignore] #[timeout_ms(3_600_000)] nested_levels_emulated_twice,
        where_am_i,
        #[ignore] #[timeout_ms(300_000)] sealed_level,
        #[ignore] kernel_backtrace,
        #[ignore] fresh_level_first,
        #[ignore] fresh_level_second,
        #[ignore] takes_ten_seconds,
        #[ignore] prints_the_wall_clock,
    ],
    remote: [descend, noop, reach_parent],
}
