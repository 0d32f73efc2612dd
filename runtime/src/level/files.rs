//! The files of levels that go when their level goes: a VM level's kernel log
//! (read from its own `/dev/kmsg`) and the console, level log, QEMU log and hop
//! journal a level below L0 keeps of the levels it booted, in a temporary folder. Before a
//! chain goes down, L0 asks for them (`Collect`) and writes them into the run
//! folder beside the files of L1, named the same way (`L0-L1-L2.console`).
//!
//! What comes from below is checked ([`LevelFile::check`]): a path in the
//! child's subtree, a known kind (so L0 chooses every file name), text cut to
//! [`FILE_LIMIT`].

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::wire::{is_below, is_level_name};

/// Bytes kept of one file: its tail.
pub const FILE_LIMIT: usize = 1 << 20;

/// Files collected per level, at most (one of each kind).
const KINDS: usize = 5;

/// One file of one level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelFile {
    /// The level it belongs to, e.g. `L0/L1/L2`.
    pub path: String,
    /// Which file.
    pub kind: FileKind,
    /// Its text (the tail, at most [`FILE_LIMIT`] bytes).
    pub text: String,
}

/// Which file of a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// Its kernel's log, read at the level.
    Dmesg,
    /// Its serial console, kept by its parent.
    Console,
    /// Its level log (boot steps, runtime's stderr), kept by its parent.
    LevelLog,
    /// Its QEMU's log, kept by its parent.
    QemuLog,
    /// The journal of its hop (what crossed it, when), kept by its parent.
    Relay,
}

impl FileKind {
    /// The suffix of its file in the run folder.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Dmesg => "dmesg",
            Self::Console => "console",
            Self::LevelLog => "log",
            Self::QemuLog => "qemu.log",
            Self::Relay => "relay",
        }
    }
}

impl LevelFile {
    /// Refuses a file a child below `child` could not honestly have sent.
    pub fn check(&self, child: &str) -> Result<(), String> {
        // Of itself a level sends its kernel log only: its console and logs are
        // its parent's own files.
        let inside = (self.path == child
            && self.kind == FileKind::Dmesg
            && child.split('/').all(is_level_name))
            || is_below(&self.path, child);
        if !inside {
            return Err(format!("a file of {:?}, outside {child}", self.path));
        }
        if self.text.len() > FILE_LIMIT {
            return Err(format!(
                "{} bytes of {} {}, over {FILE_LIMIT}",
                self.text.len(),
                self.path,
                self.kind.suffix()
            ));
        }
        Ok(())
    }

    /// Its name in the run folder: `L0-L1-L2.console`.
    pub fn file_name(&self) -> String {
        format!("{}.{}", self.path.replace('/', "-"), self.kind.suffix())
    }
}

/// Bytes of all the files of one answer: room within a relay frame.
const ANSWER_LIMIT: usize = 48 << 20;

/// The files a child at `child` sent that pass [`LevelFile::check`], each
/// refused one left out with a warning; `Err` when the answer as a whole is
/// more than an honest chain 16 deep sends (files or bytes).
pub fn checked(files: Vec<LevelFile>, child: &str) -> Result<Vec<LevelFile>, String> {
    let bytes: usize = files.iter().map(|f| f.text.len()).sum();
    if files.len() > 16 * KINDS || bytes > ANSWER_LIMIT {
        return Err(format!("{} files of {bytes} bytes", files.len()));
    }
    Ok(files
        .into_iter()
        .filter(|f| match f.check(child) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("left out a file {child} sent: {e}");
                false
            }
        })
        .collect())
}

/// `text` cut to its last [`FILE_LIMIT`] bytes, at a character boundary.
fn keep_tail(mut text: String) -> String {
    let cut = text.ceil_char_boundary(text.len().saturating_sub(FILE_LIMIT));
    text.drain(..cut);
    text
}

/// The last [`FILE_LIMIT`] bytes of `path`, as text; `None` when unreadable.
pub fn tail(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let from = len.saturating_sub(FILE_LIMIT as u64);
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut bytes = Vec::new();
    file.take(FILE_LIMIT as u64).read_to_end(&mut bytes).ok()?;
    // Invalid bytes grow into U+FFFD: cut again.
    Some(keep_tail(String::from_utf8_lossy(&bytes).into_owned()))
}

/// This machine's kernel log, as `dmesg` prints it (`[seconds] message`), its
/// tail within [`FILE_LIMIT`]; `None` when `/dev/kmsg` cannot be read.
pub fn own_kernel_log() -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut out = String::new();
    // One record per read; a buffer smaller than a record makes the read fail.
    let mut record = vec![0u8; 16 << 10];
    loop {
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(line) = format_record(&String::from_utf8_lossy(&record[..n])) {
                    out.push_str(&line);
                    out.push('\n');
                }
            }
            // A record overwritten while reading: go on with the next one.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
            Err(_) => break,
        }
        if out.len() > 2 * FILE_LIMIT {
            out = keep_tail(out);
        }
    }
    Some(keep_tail(out))
}

/// `6,339,5140900,-;NET: Registered protocol family 10` →
/// `[    5.140900] NET: Registered protocol family 10`.
fn format_record(record: &str) -> Option<String> {
    let (head, rest) = record.split_once(';')?;
    let usec: u64 = head.split(',').nth(2)?.parse().ok()?;
    // Continuation lines (` KEY=value`) follow the message.
    let message = rest.lines().next().unwrap_or_default();
    Some(format!(
        "[{:>5}.{:06}] {message}",
        usec / 1_000_000,
        usec % 1_000_000
    ))
}

/// Writes `files` into `dir`, each under [`LevelFile::file_name`].
pub fn write_all(dir: &Path, files: &[LevelFile]) -> Vec<PathBuf> {
    let mut written = Vec::new();
    for file in files {
        let path = dir.join(file.file_name());
        match std::fs::write(&path, &file.text) {
            Ok(()) => written.push(path),
            Err(e) => tracing::warn!("cannot write {}: {e}", path.display()),
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmsg_records_read_as_dmesg_prints_them() {
        assert_eq!(
            format_record("6,339,5140900,-;NET: Registered PF_INET6 protocol family\n").as_deref(),
            Some("[    5.140900] NET: Registered PF_INET6 protocol family")
        );
        assert_eq!(
            format_record("4,12,123,-;WARNING: x\n SUBSYSTEM=cpu\n").as_deref(),
            Some("[    0.000123] WARNING: x")
        );
        assert_eq!(format_record("garbage"), None);
    }

    #[test]
    fn files_from_below_stay_in_the_subtree_with_names_chosen_here() {
        let file = |path: &str, text: &str| LevelFile {
            path: path.into(),
            kind: FileKind::Console,
            text: text.into(),
        };
        assert!(
            file("L0/L1/L2", "x").check("L0/L1/L2").is_err(),
            "its own console"
        );
        let dmesg = LevelFile {
            kind: FileKind::Dmesg,
            ..file("L0/L1/L2", "x")
        };
        assert_eq!(dmesg.check("L0/L1/L2"), Ok(()));
        assert_eq!(file("L0/L1/L2/L3", "x").check("L0/L1/L2"), Ok(()));
        for bad in ["L0/L1", "L0/L1/L22", "L0/L1/L2/../x", "L0/L1/L2/L3.x"] {
            assert!(file(bad, "x").check("L0/L1/L2").is_err(), "{bad}");
        }
        let big = "x".repeat(FILE_LIMIT + 1);
        assert!(file("L0/L1/L2", &big).check("L0/L1/L2").is_err());
        assert_eq!(file("L0/L1/L2", "").file_name(), "L0-L1-L2.console");
        let many = vec![file("L0/L1/L2/L3", ""); 16 * KINDS + 1];
        assert!(checked(many, "L0/L1/L2").is_err());
        let one_bad = vec![file("L0/L1/L2/L3", "ok"), file("L0/L9", "no")];
        assert_eq!(
            checked(one_bad, "L0/L1/L2").expect("kept").len(),
            1,
            "only the bad one is left out"
        );
        // A tail of bytes that are not UTF-8 stays within the limit once converted.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console");
        std::fs::write(&path, vec![0xffu8; FILE_LIMIT + 10]).expect("write");
        let text = tail(&path).expect("read");
        assert!(text.len() <= FILE_LIMIT, "{}", text.len());
    }
}
