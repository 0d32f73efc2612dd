//! Facts about the current level and commands run there.
//!
//! Thin typed wrappers over the `matryoshka:test/host` imports.

use std::fmt;

use crate::bindings::matryoshka::test::host as wit;

use crate::ErrorKind;
pub use crate::bindings::matryoshka::test::host::Output;

/// An error returned by a host function, with the level where it happened.
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    /// The category, for tests that match on it.
    pub kind: ErrorKind,
    /// What went wrong and what to do next.
    pub message: String,
    /// The level where it happened, e.g. `L0/L1`.
    pub level_path: String,
}

impl From<crate::bindings::matryoshka::test::types::Error> for Error {
    fn from(e: crate::bindings::matryoshka::test::types::Error) -> Self {
        Self {
            kind: e.kind,
            message: e.message,
            level_path: e.level_path,
        }
    }
}

impl From<Error> for crate::bindings::matryoshka::test::types::Error {
    fn from(e: Error) -> Self {
        Self {
            kind: e.kind,
            message: e.message,
            level_path: e.level_path,
        }
    }
}

/// The host name of this level.
pub fn hostname() -> String {
    wit::hostname()
}

/// The machine architecture of this level (`x86_64`, `s390x`, ...).
pub fn arch() -> String {
    wit::arch()
}

/// The nesting depth: 0 on the machine the run started from.
pub fn level() -> u32 {
    wit::level()
}

/// The level path from the top of the chain, e.g. `L0/L1`.
pub fn level_path() -> String {
    wit::level_path()
}

/// Hex sha256 of this component, computed by this level's runtime from the
/// bytes it loaded: the same at every level of a chain.
pub fn component_sha256() -> String {
    wit::component_sha256()
}

/// Runs `argv` at this level and returns what it produced, whatever its status.
///
/// Needs `--grant exec=<argv[0]>`; without it the error kind is
/// [`ErrorKind::Denied`] and the message names the grant.
pub fn exec<S: AsRef<str>>(argv: &[S]) -> Result<Output, Error> {
    wit::exec(&to_strings(argv), None).map_err(Error::from)
}

/// Like [`exec`], with `stdin` fed to the command.
pub fn exec_with_stdin<S: AsRef<str>>(argv: &[S], stdin: &[u8]) -> Result<Output, Error> {
    wit::exec(&to_strings(argv), Some(stdin)).map_err(Error::from)
}

/// Runs `argv` and returns its standard output as text; a non-zero status is an error.
pub fn check_output<S: AsRef<str>>(argv: &[S]) -> Result<String, Error> {
    let out = exec(argv)?;
    if out.success() {
        return Ok(out.stdout_lossy());
    }
    Err(Error {
        kind: ErrorKind::Io,
        message: format!(
            "`{}` exited with {}: {}",
            to_strings(argv).join(" "),
            out.status
                .map_or("a signal".to_string(), |s| format!("status {s}")),
            String::from_utf8_lossy(&out.stderr).trim_end()
        ),
        level_path: level_path(),
    })
}

fn to_strings<S: AsRef<str>>(argv: &[S]) -> Vec<String> {
    argv.iter().map(|a| a.as_ref().to_string()).collect()
}

impl Output {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// Standard output as text, invalid UTF-8 replaced.
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Standard error as text, invalid UTF-8 replaced.
    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {}: {}",
            self.kind.as_str(),
            self.level_path,
            self.message
        )
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {}

impl ErrorKind {
    /// The WIT name of the kind, e.g. `denied`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::Denied => "denied",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Io => "io",
            ErrorKind::NotFound => "not-found",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::LevelLost => "level-lost",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Internal => "internal",
        }
    }
}
