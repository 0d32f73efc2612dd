//! Helpers shared by the runtime's integration tests: run the real binary.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `matryoshka` binary under test.
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_matryoshka"));
    cmd.env("MATRYOSHKA_CACHE_DIR", cache_dir())
        .env_remove("RUST_LOG");
    cmd
}

/// One compile cache shared by every test of this run.
pub fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("matryoshka-cache")
}

/// Runs `matryoshka` with `args` and returns what it did.
pub fn run(args: &[&str]) -> Run {
    let out = bin().args(args).output().expect("start matryoshka");
    Run::from(out)
}

/// Exit code and output of one run.
pub struct Run {
    /// Exit code; none when killed by a signal.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Asserts the exit code, printing both streams when it differs.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit code\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// The stdout line that mentions `test` with `status`, e.g. `PASS`.
    #[track_caller]
    pub fn line_for(&self, status: &str, test: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.trim_start().starts_with(status) && l.contains(&format!("::{test}")))
            .unwrap_or_else(|| panic!("no {status} line for {test} in\n{}", self.stdout))
    }
}
