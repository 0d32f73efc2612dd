//! Helpers shared by the runtime's integration tests: run the real binary.

pub mod restored;
pub mod sshd;
pub mod vm;

use sshd::{ClientKey, Sshd};

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

    /// Asserts that stdout contains `needle`, printing it when it does not.
    #[track_caller]
    pub fn expect_stdout(&self, needle: &str) -> &Self {
        assert!(
            self.stdout.contains(needle),
            "expected {needle:?} in stdout:\n{}",
            self.stdout
        );
        self
    }

    /// Asserts that stderr contains `needle`, printing it when it does not.
    #[track_caller]
    pub fn expect_stderr(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "expected {needle:?} in stderr:\n{}",
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

/// Processes whose environment holds `MATRYOSHKA_TEST_TAG=<tag>` or whose command
/// line mentions `needle`: what a run left behind.
pub fn leftovers(tag: &str, needle: Option<&str>) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    let me = std::process::id().to_string();
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let dir = entry.path();
        let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.is_empty() {
            continue; // zombies and kernel threads
        }
        let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
        let tagged = String::from_utf8_lossy(&environ)
            .split('\0')
            .any(|kv| kv == format!("MATRYOSHKA_TEST_TAG={tag}"));
        let mentioned = needle.is_some_and(|n| cmdline.contains(n));
        if tagged || mentioned {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// A tag unique to this call, for [`leftovers`].
pub fn unique_tag(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// Waits up to 5 s for `leftovers` to be empty (a killed child is reaped asynchronously).
#[track_caller]
pub fn assert_nothing_left(tag: &str, needle: Option<&str>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let left = leftovers(tag, needle);
        if left.is_empty() {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!("processes left behind:\n{}", left.join("\n"));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Real sshd servers on loopback for a chain L0 → L1 → …, one remote cache per level.
pub struct SshChain {
    /// The run's key.
    pub key: ClientKey,
    /// One server per level.
    pub servers: Vec<Sshd>,
    /// Every server's host key, pinned.
    pub known_hosts: tempfile::NamedTempFile,
    /// Holds `L<depth>` cache folders, one per level.
    pub caches: tempfile::TempDir,
}

impl SshChain {
    /// Starts `levels` servers.
    pub fn new(levels: usize) -> Self {
        let key = ClientKey::generate();
        let servers: Vec<Sshd> = (0..levels).map(|_| Sshd::start(&key)).collect();
        let known_hosts = tempfile::NamedTempFile::new().expect("known_hosts");
        let lines: String = servers
            .iter()
            .map(|s| std::fs::read_to_string(&s.known_hosts).expect("known_hosts of a server"))
            .collect();
        std::fs::write(known_hosts.path(), lines).expect("write known_hosts");
        let caches = tempfile::tempdir().expect("cache root");
        Self {
            key,
            servers,
            known_hosts,
            caches,
        }
    }

    /// The `MATRYOSHKA_CHAIN` value naming every server.
    pub fn chain(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("ssh://root@127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The SSH options of `matryoshka test`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--ssh-key".into(),
            self.key.private_key.display().to_string(),
            "--ssh-known-hosts".into(),
            self.known_hosts.path().display().to_string(),
            "--remote-cache-dir".into(),
            format!("{}/L{{depth}}", self.caches.path().display()),
            // A key made for this chain: the levels below reach the next ones with it.
            "--hand-down-ssh-key".into(),
        ]
    }

    /// The cache folder of the level at `depth`.
    pub fn cache(&self, depth: usize) -> std::path::PathBuf {
        self.caches.path().join(format!("L{depth}"))
    }
}

/// The runtimes copied into a level's cache folder `dir` (`bin/`, without their
/// compressed copies).
pub fn runtimes_in(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir.join("bin"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".gz") && !n.ends_with(".zst"))
                .collect()
        })
        .unwrap_or_default()
}

/// The built component of a suite of tests-wasm/lang (`./x langs` builds them);
/// a missing one names the command.
pub fn lang_component(lang: &str, suite: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/lang-suites")
        .join(lang)
        .join(suite)
        .join(format!("{suite}.wasm"));
    assert!(
        path.exists(),
        "{} is not built: run `./x langs` (it installs the Python, JavaScript and C \
         toolchains and builds tests-wasm/lang)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}
