//! Kernel health of a VM level: its serial console, followed while the level
//! lives, for the lines a kernel prints when something went wrong (`BUG:`,
//! `WARNING:`, `Oops`, soft lockups, hung tasks, RCU stalls, `Call Trace:`).
//! Each one goes to the output of the instance that holds the level, as a
//! `warn` log line from that level: the test that was running sees it.
//!
//! The console is written by QEMU at this level, from bytes the guest kernel
//! printed; the guest is as untrusted as the suite. Lines are cut to
//! [`LINE_LIMIT`] bytes, at most [`REPORT_LIMIT`] of them are reported per level
//! (then one line says where the rest is), and the text goes through the same
//! capture and reporters as any log line, which make it inert.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::output::{Capture, LogLevel, Stream};

/// What a kernel prints when something went wrong, as it appears in a line.
const SIGNS: &[&str] = &[
    "BUG:",
    "WARNING:",
    "Oops",
    "soft lockup",
    "hung task",
    "blocked for more than",
    "self-detected stall",
    "rcu_preempt detected stalls",
    "Call Trace:",
    "Kernel panic",
];

/// Bytes of one console line that are reported.
const LINE_LIMIT: usize = 400;
/// Lines reported per level; the console file has the rest.
const REPORT_LIMIT: usize = 40;
/// How often the console file is read.
const POLL: Duration = Duration::from_millis(500);

/// True when `line` is one of the kernel's signs of trouble.
pub fn is_trouble(line: &str) -> bool {
    SIGNS.iter().any(|sign| line.contains(sign))
}

/// Asks a [`watch`] to read its console now; it answers on the sender once it did.
pub type ReadNow = tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>;

/// Follows `console` (from byte `from`: 0 for a level that booted, the end of
/// the earlier copy's lines for one restored from a snapshot) until the task is aborted, reporting each
/// line [`is_trouble`] flags into `capture` as a warning from `level`. Besides
/// every [`POLL`], it reads at once when asked through `now` (before a test
/// ends, so what the kernel printed during the test is charged to it).
pub async fn watch(
    console: PathBuf,
    from: u64,
    level: String,
    capture: Arc<Capture>,
    mut now: tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
) {
    let mut offset = from;
    let mut partial = Vec::new();
    let mut reported = 0usize;
    let mut asked: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    loop {
        let read = {
            let console = console.clone();
            tokio::task::spawn_blocking(move || read_from(&console, offset)).await
        };
        if let Ok(Ok(bytes)) = read {
            offset += bytes.len() as u64;
            partial.extend_from_slice(&bytes);
            while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = partial.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end();
                if !is_trouble(line) {
                    continue;
                }
                reported += 1;
                let text = match reported {
                    n if n <= REPORT_LIMIT => format!("kernel: {}", cut(line)),
                    n if n == REPORT_LIMIT + 1 => format!(
                        "kernel: more signs of trouble than {REPORT_LIMIT} lines; the whole \
                         console is {}",
                        console.display()
                    ),
                    _ => continue,
                };
                // An output budget spent is the test's own failure, reported by it.
                let _ = capture.write_from(&level, Stream::Log(LogLevel::Warn), text.as_bytes());
            }
            // A line without its end yet waits for it, up to the limit.
            if partial.len() > LINE_LIMIT * 4 {
                partial.drain(..partial.len() - LINE_LIMIT);
            }
        }
        for ack in asked.drain(..) {
            let _ = ack.send(());
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            Some(ack) = now.recv() => asked.push(ack),
        }
    }
}

fn read_from(path: &std::path::Path, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    // At most 1 MiB a poll: a console flooding faster is read over several polls.
    file.take(1 << 20).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn cut(line: &str) -> &str {
    match line.char_indices().nth(LINE_LIMIT) {
        Some((at, _)) => &line[..at],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_of_trouble_are_found() {
        for line in [
            "[   93.213384] watchdog: BUG: soft lockup - CPU#1 stuck for 44s! [qemu-system-x86:199]",
            "[   12.000000] WARNING: CPU: 0 PID: 1 at lib/foo.c:10 foo+0x1/0x2",
            "[   67.649565] rcu: INFO: rcu_preempt self-detected stall on CPU",
            "[  242.1] INFO: task kworker/0:1:12 blocked for more than 120 seconds.",
            "[    5.1] Call Trace:",
            "[    1.0] Oops: 0000 [#1] SMP NOPTI",
        ] {
            assert!(is_trouble(line), "{line}");
        }
        for line in [
            "MATRYOSHKA-STEP 5.81 initramfs",
            "[    0.000000] Linux version 6.1.0-50-cloud-amd64",
            "reboot: Power down",
        ] {
            assert!(!is_trouble(line), "{line}");
        }
    }

    #[tokio::test]
    async fn lines_written_to_the_console_reach_the_capture_as_warnings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let console = dir.path().join("L1.console");
        std::fs::write(
            &console,
            "MATRYOSHKA-BOOT\n[ 1.0] WARNING: CPU: 0 at x.c:1\n",
        )
        .expect("write");
        let capture = Capture::new("L0", 1 << 20, None);
        let (now, asked) = tokio::sync::mpsc::channel(1);
        let watcher = tokio::spawn(watch(
            console.clone(),
            0,
            "L0/L1".into(),
            capture.clone(),
            asked,
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A line in two writes is one line.
        let mut more = std::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .expect("open");
        std::io::Write::write_all(&mut more, b"[ 2.0] Call ").expect("write");
        tokio::time::sleep(Duration::from_millis(700)).await;
        std::io::Write::write_all(&mut more, b"Trace:\nfine\n").expect("write");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // Asked to read now, it does so before it answers, not at its next poll.
        std::io::Write::write_all(&mut more, b"[ 3.0] BUG: at once\n").expect("write");
        let (ack, done) = tokio::sync::oneshot::channel();
        now.send(ack).await.expect("watcher listens");
        tokio::time::timeout(Duration::from_millis(300), done)
            .await
            .expect("answered before its next poll")
            .expect("answered");
        watcher.abort();
        let logs = capture.take().logs;
        let lines: Vec<(&str, &str)> = logs
            .iter()
            .map(|l| (l.level_path.as_str(), l.message.as_str()))
            .collect();
        assert_eq!(
            lines,
            [
                ("L0/L1", "kernel: [ 1.0] WARNING: CPU: 0 at x.c:1"),
                ("L0/L1", "kernel: [ 2.0] Call Trace:"),
                ("L0/L1", "kernel: [ 3.0] BUG: at once"),
            ]
        );
        assert!(logs.iter().all(|l| l.level == LogLevel::Warn));
    }

    /// A level restored from a snapshot appends to the console of the copy
    /// before it: its watcher reports only its own lines.
    #[tokio::test]
    async fn a_restored_levels_watcher_starts_after_the_earlier_copys_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let console = dir.path().join("L1.console");
        let before = "[ 1.0] WARNING: CPU: 0 at x.c:1\n";
        std::fs::write(&console, before).expect("write");
        let capture = Capture::new("L0", 1 << 20, None);
        let (now, asked) = tokio::sync::mpsc::channel(1);
        let watcher = tokio::spawn(watch(
            console.clone(),
            before.len() as u64,
            "L0/L1".into(),
            capture.clone(),
            asked,
        ));
        let mut more = std::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .expect("open");
        std::io::Write::write_all(&mut more, b"[ 9.0] BUG: after the restore\n").expect("write");
        let (ack, done) = tokio::sync::oneshot::channel();
        now.send(ack).await.expect("watcher listens");
        done.await.expect("answered");
        watcher.abort();
        let messages: Vec<String> = capture.take().logs.into_iter().map(|l| l.message).collect();
        assert_eq!(messages, ["kernel: [ 9.0] BUG: after the restore"]);
    }
}
