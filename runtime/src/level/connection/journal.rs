//! A hop's journal: what crossed it, with times, for a person reading the run
//! folder (`L0-L1.relay` beside the level's console): the handshake, each call,
//! test run and collection sent down and how it was answered. Heartbeats and
//! output are left out (the output is in the tests' logs).
//!
//! Written by the parent, on its clock, at most [`JOURNAL_LIMIT`] bytes; names
//! from the suite are escaped to one line.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

/// Bytes a journal holds at most.
pub const JOURNAL_LIMIT: u64 = 1 << 20;

/// The journal of one hop; a no-op when it has no file.
#[derive(Default)]
pub struct Journal {
    file: Mutex<Option<(std::fs::File, u64)>>,
}

impl Journal {
    /// A journal written to `path` (created anew), or none when it cannot be.
    pub fn create(path: &Path) -> Self {
        let file = std::fs::File::create(path)
            .map_err(|e| tracing::warn!("cannot write {}: {e}", path.display()))
            .ok();
        Self {
            file: Mutex::new(file.map(|f| (f, 0))),
        }
    }

    /// Writes `what` with the time, as one line.
    pub fn note(&self, what: &str) {
        let mut slot = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let Some((file, written)) = slot.as_mut() else {
            return;
        };
        let time = chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now())
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let line = format!("{time} {}\n", what.escape_debug());
        if *written + line.len() as u64 > JOURNAL_LIMIT {
            let _ = writeln!(file, "{time} (journal full: the rest is left out)");
            *slot = None;
            return;
        }
        *written += line.len() as u64;
        let _ = file.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_timed_escaped_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("L0-L1.relay");
        let journal = Journal::create(&path);
        journal.note("→ test `a\nb\u{1b}[31m` #1");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with(" → test `a\\nb\\u{1b}[31m` #1\n"), "{text}");
        let long = "x".repeat(64 << 10);
        for _ in 0..20 {
            journal.note(&long);
        }
        let size = std::fs::metadata(&path).expect("size").len();
        assert!(size <= JOURNAL_LIMIT + 100, "{size}");
        assert!(
            std::fs::read_to_string(&path)
                .expect("read")
                .contains("journal full")
        );
    }
}
