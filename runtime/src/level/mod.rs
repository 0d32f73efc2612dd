//! Where this runtime sits in a chain of levels, and (in [`qemu`]) the command
//! lines that boot VM levels.

pub mod qemu;
pub mod vm;

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
