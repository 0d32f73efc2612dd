//! Relay benchmarks behind docs/benchmarks.md (ignored by default; `./x bench` runs them).
//!
//! Three sshd servers on loopback form a chain. Measured side by side in one run:
//! a no-op call at depth 1, 2, 3 through this relay, a plain `ssh` chain running
//! `true`, a message echoed by `cat` through the same hops (the transport alone), and
//! mitogen calling a no-op function through them; then the time to reach each level
//! with empty caches (copy + start; with the levels' own account of each hop) and
//! with warm ones. `BENCH_FIRST_CONTACT_ONLY=1`: first contact only, beside mitogen's.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Instant;

use common::{SshChain, bin};
use matryoshka_test_programs::RELAY;

const CALLS: usize = 1000;
const SSH_RUNS: usize = 20;

fn bench_lines(stdout: &str) -> Vec<String> {
    let mut lines: Vec<String> = stdout
        .lines()
        .filter(|l| l.contains("| BENCH "))
        .map(|l| l.split("| BENCH ").nth(1).unwrap_or_default().to_string())
        .collect();
    lines.dedup();
    lines
}

#[test]
#[ignore = "benchmark: run with `./x bench`"]
fn relay_benchmarks() {
    let chain = SshChain::new(3);
    let servers = &chain.servers;
    let key_path = chain.key.private_key.display().to_string();
    let known_path = chain.known_hosts.path().display().to_string();
    let cache_arg = format!("{}/L{{depth}}", chain.caches.path().display());
    let targets: Vec<String> = servers
        .iter()
        .map(|s| format!("ssh://root@127.0.0.1:{}", s.port))
        .collect();
    let relay = |depth: usize, test: &str, verbose: bool| {
        let chain = format!("MATRYOSHKA_CHAIN={}", targets[..depth].join(","));
        let calls = format!("BENCH_CALLS={CALLS}");
        let out = bin()
            .args(if verbose { &["-v"][..] } else { &[][..] })
            .args(["test", RELAY, "--ignored", "--exact", test, "--nocapture"])
            .args(["--env", &chain, "--env", &calls, "--timeout", "600"])
            .args(["--ssh-key", &key_path, "--ssh-known-hosts", &known_path])
            .arg("--hand-down-ssh-key")
            .args(["--remote-cache-dir", &cache_arg])
            .output()
            .expect("run matryoshka");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if verbose {
            // Where each hop's first contact went, from the levels' own logs.
            for l in String::from_utf8_lossy(&out.stderr).lines() {
                if l.contains("level::ssh:") || l.contains("after Load") {
                    println!("    {}", l.trim());
                }
            }
        }
        bench_lines(&stdout)
    };

    println!("first contact, empty caches (copy + start):");
    for l in relay(3, "bench_first_contact", true) {
        println!("  relay {l}");
    }
    println!("first contact, warm caches:");
    for _ in 0..3 {
        for l in relay(3, "bench_first_contact", false) {
            println!("  relay {l}");
        }
    }

    if std::env::var_os("BENCH_FIRST_CONTACT_ONLY").is_some() {
        mitogen(&key_path, &known_path, servers, 10);
        return;
    }

    println!("no-op round trip:");
    for depth in 1..=3 {
        for l in relay(depth, "bench_round_trips", false) {
            println!("  relay {l}");
        }
    }

    // A plain ssh chain: a new session per hop per run.
    let ssh_opts = format!(
        "-i {key_path} -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile={known_path} -o StrictHostKeyChecking=yes"
    );
    for depth in 1..=3 {
        let mut cmd = "true".to_string();
        for s in servers[..depth].iter().rev() {
            cmd = format!(
                "ssh {ssh_opts} -p {} root@127.0.0.1 {}",
                s.port,
                shell_quote(&cmd)
            );
        }
        let mut samples = Vec::new();
        for _ in 0..SSH_RUNS {
            let t = Instant::now();
            let st = Command::new("sh").args(["-c", &cmd]).status().expect("ssh");
            assert!(st.success(), "{cmd}");
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        samples.sort_by(f64::total_cmp);
        println!(
            "  ssh depth={depth} runs={SSH_RUNS} median_us={:.1}",
            samples[SSH_RUNS / 2]
        );
    }

    // The transport alone: a small message echoed by `cat` at the end of the same
    // chain of SSH hops (one session per hop, kept open), for what the relay adds
    // per hop over its own transport.
    for depth in 1..=3 {
        let mut cmd = "cat".to_string();
        for s in servers[1..depth].iter().rev() {
            cmd = format!(
                "ssh {ssh_opts} -p {} root@127.0.0.1 {}",
                s.port,
                shell_quote(&cmd)
            );
        }
        let mut child = Command::new("ssh")
            .args(ssh_opts.split_whitespace())
            .args(["-p", &servers[0].port.to_string(), "root@127.0.0.1", &cmd])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("ssh");
        let (Some(mut input), Some(mut output)) = (child.stdin.take(), child.stdout.take()) else {
            panic!("ssh without pipes");
        };
        let message = [b'x'; 32];
        let mut echoed = [0u8; 32];
        let mut samples = Vec::new();
        for i in 0..CALLS + 50 {
            let t = Instant::now();
            input.write_all(&message).expect("write to the ssh chain");
            output
                .read_exact(&mut echoed)
                .expect("read from the ssh chain");
            if i >= 50 {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        drop(input);
        let _ = child.wait();
        samples.sort_by(f64::total_cmp);
        println!(
            "  ssh-echo depth={depth} calls={CALLS} median_us={:.1}",
            samples[CALLS / 2]
        );
    }

    mitogen(&key_path, &known_path, servers, CALLS);
}

/// mitogen's first contact and no-op round trip through the same hops.
fn mitogen(key_path: &str, known_path: &str, servers: &[common::sshd::Sshd], calls: usize) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/mitogen_chain.py");
    let ports: Vec<String> = servers.iter().map(|s| s.port.to_string()).collect();
    let out = Command::new("python3")
        .arg(script)
        .args([key_path, known_path, &calls.to_string()])
        .args(&ports)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for l in stdout.lines() {
        println!("  mitogen {l}");
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
