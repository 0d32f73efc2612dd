//! Levels: where this runtime sits in a chain, and the parent side of a hop.
//!
//! - [`connection`]: a live connection to a child runtime: handshake, calls,
//!   events, heartbeat.
//! - [`transport`]: byte streams to a child runtime, behind one interface.
//! - [`local`], [`ssh`], [`vm`]: the three kinds of level.
//! - [`replicate`]: which runtime binary a level below gets.
//! - [`budget`]: how many levels a test holds, counted at L0.
//!
//! Each runtime relays only to its direct children: a level's events travel up
//! one hop at a time, tagged with the level path where they happened.

pub mod access;
pub mod budget;
pub mod connection;
pub mod files;
pub mod local;
pub mod replicate;
pub mod ssh;
pub mod transport;
pub mod vm;

pub use transport::Target;

/// Facts about the level this runtime runs at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelInfo {
    /// Nesting depth; 0 where the run started.
    pub depth: u32,
    /// Path from the top, e.g. `L0/L1`.
    pub path: String,
    /// Host name of this machine.
    pub hostname: String,
    /// Architecture, as `uname -m` prints it.
    pub arch: String,
}

impl LevelInfo {
    /// The top of a chain: level 0 on this machine.
    pub fn top() -> Self {
        let (hostname, arch) = uname();
        Self {
            depth: 0,
            path: "L0".to_string(),
            hostname,
            arch,
        }
    }
}

/// Host name and machine of this kernel, as `uname -n` and `uname -m` print them.
pub fn uname() -> (String, String) {
    // SAFETY: `utsname` is plain old data; `uname` fills it and NUL-terminates each field.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable `utsname`.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return ("localhost".to_string(), std::env::consts::ARCH.to_string());
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (field(&uts.nodename), field(&uts.machine))
}
