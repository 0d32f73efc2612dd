//! The relay end to end: chains of real runtimes, over local processes and
//! over real sshd servers on loopback, and what happens when a level fails.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use common::{Run, SshChain, assert_nothing_left, bin, runtimes_in, unique_tag};
use matryoshka_test_programs::{CI, RELAY};

/// Runs the relay suite with `chain`, tagging every process it starts.
fn relay(tag: &str, chain: &str, extra: &[&str]) -> Run {
    let chain = format!("MATRYOSHKA_CHAIN={chain}");
    let out = bin()
        .env("MATRYOSHKA_TEST_TAG", tag)
        .args(["test", RELAY, "--env", &chain, "--nocapture"])
        .args(extra)
        .output()
        .expect("start matryoshka");
    Run::from(out)
}

#[test]
fn a_chain_of_four_local_runtimes() {
    let tag = unique_tag("local4");
    let r = relay(&tag, "local,local,local,local", &["-j", "2"]);
    r.expect_code(0);
    r.expect_stdout("7 passed, 0 failed, 5 ignored");
    // Logs and stdout of the deepest level come up tagged with its level path.
    r.expect_stdout("info L0/L1/L2/L3/L4 streams_a_log_line_from_the_deepest_level | hello from the bottom (logged at L0/L1/L2/L3/L4)");
    r.expect_stdout("stdout L0/L1/L2/L3/L4 streams_a_log_line_from_the_deepest_level | hello from the bottom (printed at L0/L1/L2/L3/L4)");
    r.expect_stdout("reached L0/L1/L2/L3/L4 on");
    assert_nothing_left(&tag, None);
}

/// Inode and modification time of every file under `dir`, by path.
fn file_identities(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut found = BTreeMap::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder)
            .expect("read cache folder")
            .flatten()
        {
            let meta = entry.metadata().expect("stat");
            if meta.is_dir() {
                folders.push(entry.path());
            } else {
                let mtime = meta.modified().expect("mtime");
                found.insert(entry.path(), (meta.ino(), mtime));
            }
        }
    }
    found
}

/// How many lines of `text` contain `needle`.
fn lines_with(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn a_chain_of_three_ssh_hops_copies_the_runtime_to_each_and_a_warm_run_copies_nothing() {
    let chain = SshChain::new(3);
    let tag = unique_tag("ssh3");
    let args = chain.args();
    let mut extra: Vec<&str> = args.iter().map(String::as_str).collect();
    // `-v`: every level's runtime says what it copied and what it found cached.
    extra.extend(["-j", "1", "-v"]);
    let r = relay(&tag, &chain.chain(), &extra);
    r.expect_code(0);
    r.expect_stdout("7 passed, 0 failed, 5 ignored");
    r.expect_stdout(
        "info L0/L1/L2/L3 streams_a_log_line_from_the_deepest_level | hello from the bottom",
    );
    for depth in 1..=3 {
        let cache = chain.cache(depth);
        let runtimes = runtimes_in(&cache);
        assert_eq!(
            runtimes.len(),
            1,
            "L{depth} cache {}: {runtimes:?}",
            cache.display()
        );
        assert!(runtimes[0].starts_with("matryoshka-"), "{runtimes:?}");
        let components = std::fs::read_dir(cache.join("components"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(components, 1, "component cached at L{depth}");
        let to = format!("to {}/bin/matryoshka-", cache.display());
        assert!(
            r.stderr
                .lines()
                .any(|l| l.contains("copying the runtime (") && l.contains(&to)),
            "no copy to L{depth}:\n{}",
            r.stderr
        );
    }
    assert_eq!(
        lines_with(&r.stderr, "copying the runtime ("),
        3,
        "{}",
        r.stderr
    );
    assert_eq!(lines_with(&r.stderr, "received after"), 3, "{}", r.stderr);
    let needle = chain.caches.path().display().to_string();
    assert_nothing_left(&tag, Some(&needle));
    let cold: Vec<_> = (1..=3).map(|d| file_identities(&chain.cache(d))).collect();

    // Warm: every level starts the runtime and loads the component it has, the same
    // tests pass, and not one file of any level's cache is written or replaced.
    let r = relay(&tag, &chain.chain(), &extra);
    r.expect_code(0);
    r.expect_stdout("7 passed, 0 failed");
    assert_eq!(
        lines_with(&r.stderr, "copying the runtime"),
        0,
        "{}",
        r.stderr
    );
    assert_eq!(lines_with(&r.stderr, "received after"), 0, "{}", r.stderr);
    for (server, depth) in chain.servers.iter().zip(1..) {
        let warm = format!(
            "ssh://root@127.0.0.1:{}: cached runtime started",
            server.port
        );
        assert!(lines_with(&r.stderr, &warm) > 0, "L{depth}:\n{}", r.stderr);
    }
    for depth in 1..=3 {
        let path: Vec<String> = (0..=depth).map(|l| format!("L{l}")).collect();
        let cached = format!("was cached here level={} ", path.join("/"));
        assert!(
            lines_with(&r.stderr, &cached) > 0,
            "L{depth}:\n{}",
            r.stderr
        );
    }
    for (depth, before) in (1..=3).zip(&cold) {
        assert_eq!(
            &file_identities(&chain.cache(depth)),
            before,
            "the warm run wrote to the cache of L{depth}"
        );
    }
    assert_nothing_left(&tag, Some(&needle));
}

#[test]
fn an_unpinned_host_key_is_refused() {
    let chain = SshChain::new(1);
    std::fs::write(chain.known_hosts.path(), "").expect("empty known_hosts");
    let tag = unique_tag("unpinned");
    let args = chain.args();
    let mut extra: Vec<&str> = args.iter().map(String::as_str).collect();
    extra.extend(["--exact", "reaches_every_level"]);
    let r = relay(&tag, &chain.chain(), &extra);
    r.expect_code(101);
    let port = chain.servers[0].port;
    let line = r.line_for("FAIL", "reaches_every_level");
    assert!(
        line.contains(&format!(
            "host key of [127.0.0.1]:{port} is not pinned for this run"
        )),
        "{line}"
    );
    assert!(
        runtimes_in(&chain.cache(1)).is_empty(),
        "nothing may be copied to an unverified host"
    );
}

#[test]
fn nest_needs_its_grant() {
    let tag = unique_tag("nogrant");
    let r = relay(
        &tag,
        "local",
        &[
            "--no-config",
            "--grant",
            "exec=sh",
            "--exact",
            "reaches_every_level",
        ],
    );
    r.expect_code(100);
    let line = r.line_for("FAIL", "reaches_every_level");
    assert!(
        line.contains(
            "denied at L0: reaching another level is not granted at L0; add --grant nest"
        ),
        "{line}"
    );
}

/// Starts the `hold_at_the_bottom` test and returns the child and the pid of the
/// bottom runtime once it is holding.
#[expect(
    clippy::zombie_processes,
    reason = "the caller waits for the child it gets back"
)]
fn start_holding(
    tag: &str,
    chain: &str,
    extra: &[String],
) -> (
    std::process::Child,
    u32,
    BufReader<std::process::ChildStdout>,
) {
    let chain = format!("MATRYOSHKA_CHAIN={chain}");
    let mut child = bin()
        .env("MATRYOSHKA_TEST_TAG", tag)
        .args(["test", RELAY, "--env", &chain, "--env", "HOLD_MS=60000"])
        .args(["--nocapture", "--ignored", "--exact", "hold_at_the_bottom"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start matryoshka");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap_or(0);
        if n == 0 {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the run ended before the bottom level held");
        }
        if let Some(pid) = line.split("in runtime pid ").nth(1) {
            let pid = pid.trim().parse().expect("pid");
            return (child, pid, out);
        }
    }
}

fn rest(mut out: BufReader<std::process::ChildStdout>) -> String {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut out, &mut s).expect("read");
    s
}

#[test]
fn killing_a_level_mid_call_reports_it_lost() {
    let tag = unique_tag("kill");
    // The bottom level holds inside `sh -c sleep`: it must go when its level goes.
    let extra = ["--env".to_string(), "HOLD_WITH_EXEC=1".to_string()];
    let (mut child, pid, out) = start_holding(&tag, "local,local", &extra);
    let killed = Instant::now();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    let took = killed.elapsed();
    let stdout = rest(out);
    assert_eq!(status.code(), Some(101), "{stdout}");
    assert!(
        stdout.contains("infrastructure: level L0/L1/L2 lost: connection closed (its runtime was killed by signal 9 (SIGKILL))"),
        "{stdout}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_nothing_left(&tag, None);
}

#[test]
fn interrupting_the_run_tears_the_chain_down() {
    let tag = unique_tag("sigint");
    let (mut child, _pid, out) = start_holding(&tag, "local,local,local", &[]);
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    drop(out);
    assert_eq!(status.code(), Some(130));
    assert_nothing_left(&tag, None);
}

#[test]
fn a_silent_level_is_lost_by_heartbeat() {
    let tag = unique_tag("stop");
    let (mut child, pid, out) = start_holding(&tag, "local,local", &[]);
    std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    let stdout = rest(out);
    assert_eq!(status.code(), Some(101), "{stdout}");
    assert!(
        stdout.contains("level L0/L1/L2 lost: it stopped answering heartbeats for"),
        "{stdout}"
    );
    assert_nothing_left(&tag, None);
}

#[test]
fn a_dropped_ssh_connection_reports_the_level_lost() {
    let chain = SshChain::new(1);
    let tag = unique_tag("drop");
    let (mut child, _pid, out) = start_holding(&tag, &chain.chain(), &chain.args());
    // Kill the per-connection sshd processes (children of this server's listener).
    let config = chain.servers[0].dir().join("sshd_config");
    let listener = std::process::Command::new("pgrep")
        .args(["-f", &config.display().to_string()])
        .output()
        .expect("pgrep");
    let listener = String::from_utf8_lossy(&listener.stdout);
    let listener = listener
        .lines()
        .next()
        .expect("the sshd listener is running")
        .trim()
        .to_string();
    let status = std::process::Command::new("pkill")
        .args(["-9", "-P", &listener])
        .status()
        .expect("pkill");
    assert!(status.success(), "no sshd session to kill under {listener}");
    let exit = child.wait().expect("wait");
    let stdout = rest(out);
    assert_eq!(exit.code(), Some(101), "{stdout}");
    assert!(
        stdout.contains("infrastructure: level L0/L1 lost:"),
        "{stdout}"
    );
    let needle = chain.caches.path().display().to_string();
    assert_nothing_left(&tag, Some(&needle));
}

fn fake_child(dir: &Path, script: &str) -> String {
    let path = dir.join("fake-serve.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("write script");
    std::process::Command::new("chmod")
        .args(["+x"])
        .arg(&path)
        .status()
        .expect("chmod");
    path.display().to_string()
}

/// Runs `reaches_every_level` with the local child command replaced by `serve`.
fn with_local_serve(tag: &str, serve: &str) -> Run {
    let out = bin()
        .env("MATRYOSHKA_TEST_TAG", tag)
        .env("MATRYOSHKA_LOCAL_SERVE", serve)
        .args([
            "test",
            RELAY,
            "--env",
            "MATRYOSHKA_CHAIN=local",
            "--exact",
            "reaches_every_level",
        ])
        .output()
        .expect("run");
    Run::from(out)
}

#[test]
fn garbage_frames_are_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = fake_child(
        dir.path(),
        r"printf '\000\000\000\004\377\377\377\377'; exec sleep 30",
    );
    let tag = unique_tag("garbage");
    let r = with_local_serve(&tag, &script);
    r.expect_code(101);
    let line = r.line_for("FAIL", "reaches_every_level");
    assert!(
        line.contains("level L0/L1 could not be started: malformed frame (4 bytes)"),
        "{line}"
    );
    assert_nothing_left(&tag, None);
}

#[test]
fn a_protocol_version_mismatch_is_named() {
    let serve = format!(
        "{} serve --stdio --protocol-version 99",
        env!("CARGO_BIN_EXE_matryoshka")
    );
    let tag = unique_tag("version");
    let r = with_local_serve(&tag, &serve);
    r.expect_code(101);
    let line = r.line_for("FAIL", "reaches_every_level");
    assert!(
        line.contains(&format!(
            "infrastructure: the runtime at L0/L1 speaks relay protocol version 99, this one \
             speaks {}",
            matryoshka::wire::PROTOCOL_VERSION
        )),
        "{line}"
    );
    assert_nothing_left(&tag, None);
}

/// Runs `reaches_every_level` over `chain` with `env` set for L0.
fn reach(chain: &SshChain, tag: &str, env: &[(&str, &Path)]) -> Run {
    let mut cmd = bin();
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = cmd
        .env("MATRYOSHKA_TEST_TAG", tag)
        .args(["test", RELAY, "--env"])
        .arg(format!("MATRYOSHKA_CHAIN={}", chain.chain()))
        .args(chain.args())
        .args(["--exact", "reaches_every_level"])
        .output()
        .expect("start matryoshka");
    Run::from(out)
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_runtime_that_arrives_as_another_binary_is_not_kept_or_run() {
    // The runtime to send is this one, but the compressed copies beside it (one
    // is sent as is, by what the machine can unpack) hold another program.
    let runtimes = tempfile::tempdir().expect("runtime dir");
    let arch_dir = runtimes.path().join(std::env::consts::ARCH);
    std::fs::create_dir(&arch_dir).expect("arch dir");
    let runtime = arch_dir.join("matryoshka");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_matryoshka"), &runtime).expect("link");
    let marker = runtimes.path().join("ran");
    let other = format!("#!/bin/sh\ntouch {}\n", marker.display());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, other.as_bytes()).expect("compress");
    std::fs::write(arch_dir.join("matryoshka.gz"), gz.finish().expect("gzip")).expect("write .gz");
    let zst = zstd::encode_all(other.as_bytes(), 3).expect("zstd");
    std::fs::write(arch_dir.join("matryoshka.zst"), zst).expect("write .zst");

    let chain = SshChain::new(1);
    let tag = unique_tag("badgz");
    let r = reach(&chain, &tag, &[("MATRYOSHKA_RUNTIME_DIR", runtimes.path())]);
    r.expect_code(101);
    r.line_for("FAIL", "reaches_every_level");
    // The FAIL line shows the message's start; the failures section all of it.
    let line = &r.stdout;
    let bin_dir = chain.cache(1).join("bin");
    assert!(
        line.contains(&format!(
            "the runtime copied to {}/matryoshka-",
            bin_dir.display()
        )),
        "{line}"
    );
    assert!(line.contains("so it was not kept"), "{line}");
    assert!(
        [".gz", ".zst"].iter().any(|suffix| line.contains(&format!(
            "the compressed copy sent ({}{suffix})",
            runtime.display()
        ))),
        "{line}"
    );
    assert!(!marker.exists(), "the other program ran");
    assert_eq!(
        files_in(&bin_dir),
        Vec::<String>::new(),
        "left in {}",
        bin_dir.display()
    );
    let needle = chain.caches.path().display().to_string();
    assert_nothing_left(&tag, Some(&needle));
}

#[test]
fn a_cached_runtime_is_not_run_from_a_folder_others_can_write_to() {
    let chain = SshChain::new(1);
    let tag = unique_tag("unsafecache");
    reach(&chain, &tag, &[]).expect_code(0);
    let bin_dir = chain.cache(1).join("bin");
    for made in [chain.cache(1), bin_dir.clone()] {
        let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&made).expect("stat"));
        assert_eq!(mode & 0o777, 0o700, "{}", made.display());
    }
    // Swap the cached runtime for a program that leaves a mark.
    let runtimes: Vec<String> = runtimes_in(&chain.cache(1));
    assert_eq!(runtimes.len(), 1, "{runtimes:?}");
    let cached = bin_dir.join(&runtimes[0]);
    let marker = chain.caches.path().join("ran");
    let chmod = |path: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    // Renamed into place: the runtime of the first run may still be exiting.
    let planted = bin_dir.join("planted");
    std::fs::write(
        &planted,
        format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display()),
    )
    .expect("plant");
    chmod(&planted, 0o755);
    std::fs::rename(&planted, &cached).expect("plant");
    chmod(&bin_dir, 0o777);
    let r = reach(&chain, &tag, &[]);
    r.expect_code(101);
    let line = r.line_for("FAIL", "reaches_every_level");
    assert!(
        line.contains(&format!(
            "refusing the runtime cache there, another user could replace the runtime in it: \
             {} is mode 0777 (writable by group and others) (fix: `chmod 700 {}` there",
            bin_dir.display(),
            bin_dir.display()
        )),
        "{line}"
    );
    assert!(!marker.exists(), "the planted runtime ran");

    // Control: from a safe folder the same file is what the warm path starts.
    chmod(&bin_dir, 0o700);
    reach(&chain, &tag, &[]).expect_code(101);
    assert!(
        marker.exists(),
        "the warm path did not start {}",
        cached.display()
    );
    let needle = chain.caches.path().display().to_string();
    assert_nothing_left(&tag, Some(&needle));
}

// ---- claims of the README, proven over real local chains ----

/// Runs the ignored `output_below_counts_at_l0` test over `chain` with `extra`.
fn print_below(tag: &str, chain: &str, extra: &[&str]) -> Run {
    let mut args = vec!["--ignored", "--exact", "output_below_counts_at_l0"];
    args.extend(extra);
    relay(tag, chain, &args)
}

#[test]
fn output_written_below_counts_against_the_budget_at_l0() {
    // Four calls each print 1000 bytes at L2; each call starts a fresh budget at
    // the levels below, so only L0's count of the test's output can reach 2500.
    let tag = unique_tag("budget");
    let r = print_below(&tag, "local,local", &["--max-output", "2500"]);
    r.expect_code(100);
    let line = r.line_for("FAIL", "output_below_counts_at_l0");
    assert!(
        line.contains("output-limit: output limit exceeded: the test wrote more than 2500 bytes"),
        "{line}"
    );
    // Control: the same 4000 bytes fit a budget of 5000.
    let r = print_below(&tag, "local,local", &["--max-output", "5000"]);
    r.expect_code(0);
    r.line_for("PASS", "output_below_counts_at_l0");
    assert_nothing_left(&tag, None);
}

#[test]
fn one_remote_call_over_the_budget_fails_the_test_with_output_limit() {
    let tag = unique_tag("budget1");
    let one_call = ["--env", "PRINT_CALLS=1", "--env", "PRINT_BYTES=5000"];
    let r = print_below(
        &tag,
        "local",
        &[&one_call[..], &["--max-output", "2500"]].concat(),
    );
    r.expect_code(100);
    let line = r.line_for("FAIL", "output_below_counts_at_l0");
    assert!(
        line.contains("output-limit: output limit exceeded"),
        "{line}"
    );
    assert_nothing_left(&tag, None);
}

#[test]
fn the_ssh_key_stays_at_l0_unless_it_may_be_handed_down() {
    let chain = SshChain::new(2);
    let tag = unique_tag("keystays");
    let args: Vec<String> = chain
        .args()
        .into_iter()
        .filter(|a| a != "--hand-down-ssh-key")
        .collect();
    let mut extra: Vec<&str> = args.iter().map(String::as_str).collect();
    extra.extend(["--exact", "reaches_every_level"]);
    let r = relay(&tag, &chain.chain(), &extra);
    r.expect_code(101);
    r.line_for("FAIL", "reaches_every_level");
    let port = chain.servers[1].port;
    r.expect_stdout(&format!(
        "the run's SSH key stays at L0: reaching [127.0.0.1]:{port} from a level below needs \
         --hand-down-ssh-key"
    ));
    let needle = chain.caches.path().display().to_string();
    assert_nothing_left(&tag, Some(&needle));
}

#[test]
fn target_makes_an_existing_machine_l1_from_the_command_line() {
    let chain = SshChain::new(1);
    let tag = unique_tag("target");
    let mut args: Vec<String> = vec!["test".into(), CI.into(), "--target".into(), chain.chain()];
    args.extend(chain.args());
    args.extend(["--nocapture".into(), "level_is_named".into()]);
    let out = bin()
        .env("MATRYOSHKA_TEST_TAG", &tag)
        .args(&args)
        .output()
        .expect("start matryoshka");
    let r = Run::from(out);
    r.expect_code(0);
    let line = r.line_for("PASS", "level_is_named");
    assert!(line.contains("L0/L1 ci::level_is_named"), "{line}");
    r.expect_stdout("running at L0/L1");
    assert!(
        r.stderr.contains("reaching root@127.0.0.1:") && r.stderr.contains("L0/L1 is up"),
        "{}",
        r.stderr
    );
    // The runtime was copied to the machine's cache, as for any SSH level.
    assert_eq!(runtimes_in(&chain.cache(1)).len(), 1);
    assert_nothing_left(&tag, None);
    // Without a key there is nothing to log in with: a usage error naming both options.
    let r = common::run(&["test", CI, "--target", &chain.chain()]);
    r.expect_code(2);
    r.expect_stderr("--target ssh://... needs --ssh-key FILE and --ssh-known-hosts FILE");
}

#[test]
fn a_chain_that_does_not_come_up_is_tried_again_with_retries() {
    let chain = SshChain::new(1);
    // Nothing listens on the discard port of loopback.
    let mut args: Vec<String> = vec![
        "test".into(),
        CI.into(),
        "--target".into(),
        "ssh://root@127.0.0.1:9".into(),
        "--retries".into(),
        "1".into(),
        "--format".into(),
        "tap".into(),
    ];
    args.extend(chain.args());
    let out = bin().args(&args).output().expect("start matryoshka");
    let r = Run::from(out);
    r.expect_code(101);
    r.expect_stderr("the chain did not boot (try 1 of 2)");
    r.expect_stderr("error: the chain did not boot:");
    assert!(
        r.stdout.starts_with("Bail out! the chain did not boot:"),
        "{}",
        r.stdout
    );
}
