//! The human report in a real terminal (tmux): one progress bar whose timer
//! moves during a long test, SLOW lines, and no stale copy of the bar left
//! between the result lines.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use matryoshka_test_programs::HOSTILE;

/// A tmux server of its own (its socket in a temp dir), killed when dropped.
struct Tmux {
    socket: tempfile::TempDir,
}

impl Tmux {
    fn new() -> Self {
        let ok = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "tmux is missing: install it with ./x setup (Debian package tmux)"
        );
        Self {
            socket: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(self.socket.path().join("tmux"));
        cmd
    }

    fn start(&self, shell_command: &str) {
        let status = self
            .cmd()
            .args(["new-session", "-d", "-x", "160", "-y", "40", "-s", "t"])
            .arg(shell_command)
            .status()
            .expect("tmux new-session");
        assert!(status.success(), "tmux new-session: {status}");
    }

    /// The screen once a line satisfies `seen` (within 30 s), blank lines dropped.
    fn screen_when(&self, what: &str, seen: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen();
            if screen.iter().any(|l| seen(l)) {
                return screen;
            }
            assert!(Instant::now() < deadline, "{what}:\n{}", screen.join("\n"));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The visible screen, blank lines dropped.
    fn screen(&self) -> Vec<String> {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "t"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

fn is_bar(line: &str) -> bool {
    line.contains('░') || line.contains('█')
}

#[test]
fn the_progress_bar_ticks_and_leaves_no_stale_copies() {
    let tmux = Tmux::new();
    let command = format!(
        "{} test {HOSTILE} --no-config -j 1 --timeout 3500ms --slow-timeout 1s \
         -E 'test(infinite_loop) or test(well_behaved)'; echo RUN-ENDED; sleep 60",
        env!("CARGO_BIN_EXE_matryoshka")
    );
    tmux.start(&format!(
        "env MATRYOSHKA_CACHE_DIR={} {command}",
        common::cache_dir().display()
    ));
    // While infinite_loop spins: one bar, its timer past zero, SLOW lines above it.
    let during = tmux.screen_when("no SLOW line", |l| l.contains("SLOW [>   2."));
    let bars: Vec<&String> = during.iter().filter(|l| is_bar(l)).collect();
    assert_eq!(
        bars.len(),
        1,
        "one bar while running:\n{}",
        during.join("\n")
    );
    assert!(
        bars[0].contains("[00:00:02]") || bars[0].contains("[00:00:03]"),
        "the timer moves:\n{}",
        during.join("\n")
    );
    assert_eq!(
        during.last(),
        Some(bars[0]),
        "the bar is the last line:\n{}",
        during.join("\n")
    );
    // After the run: the lines in order, no bar anywhere.
    let after = tmux.screen_when("the run did not end", |l| l == "RUN-ENDED");
    assert!(
        !after.iter().any(|l| is_bar(l)),
        "a stale bar:\n{}",
        after.join("\n")
    );
    let starts: Vec<&str> = after
        .iter()
        .map(|l| l.trim_start())
        .filter(|l| l.starts_with("SLOW") || l.starts_with("FAIL") || l.starts_with("PASS"))
        .map(|l| &l[..4])
        .collect();
    assert_eq!(
        starts,
        ["SLOW", "SLOW", "SLOW", "FAIL", "PASS"],
        "{}",
        after.join("\n")
    );
}
