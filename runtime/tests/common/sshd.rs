//! A real OpenSSH server (`/usr/sbin/sshd`) for tests of the SSH transport.
//!
//! [`Sshd::start`] runs sshd as the current user (root, in the test
//! environment) on a free loopback port, with a temporary host key, a
//! temporary `authorized_keys` holding one [`ClientKey`], and a matching
//! `known_hosts` file for clients. Everything lives in a temporary directory
//! that is removed, and the server killed, when the [`Sshd`] is dropped.
//!
//! Needs the `openssh-server` and `openssh-client` packages (`sshd`, `ssh`,
//! `ssh-keygen`) and enough privilege to create `/run/sshd`, sshd's privilege
//! separation directory, when it is missing.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The OpenSSH server binary; sshd re-executes itself, so the path must be absolute.
const SSHD: &str = "/usr/sbin/sshd";
/// sshd's privilege separation directory, which it refuses to start without.
const PRIVSEP_DIR: &str = "/run/sshd";
/// How many ports to try when another process takes the chosen one first.
const PORT_ATTEMPTS: usize = 5;
/// How long sshd gets to start accepting connections.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);

/// An ed25519 client key pair in its own temporary directory.
pub struct ClientKey {
    /// The private key file, for `ssh -i`.
    pub private_key: PathBuf,
    /// The public key line, `ssh-ed25519 AAAA... matryoshka-test`, for `authorized_keys`.
    pub public_line: String,
    dir: TempDir,
}

impl ClientKey {
    /// Generates a fresh passphrase-less ed25519 key pair with `ssh-keygen`.
    pub fn generate() -> ClientKey {
        let dir = TempDir::new().expect("create temp dir for the client key");
        let private_key = dir.path().join("id_ed25519");
        keygen(&private_key, "matryoshka-test");
        let public_line = read_public_line(&private_key);
        ClientKey {
            private_key,
            public_line,
            dir,
        }
    }

    /// The temporary directory holding the key pair.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A running sshd on `127.0.0.1:port`; killed when dropped.
pub struct Sshd {
    /// The loopback port sshd listens on.
    pub port: u16,
    /// The server's host public key, `ssh-ed25519 AAAA...` (no comment).
    pub host_key_pub: String,
    /// A `known_hosts` file with the single line `[127.0.0.1]:PORT ssh-ed25519 AAAA...`.
    pub known_hosts: PathBuf,
    child: Child,
    dir: TempDir,
}

impl Sshd {
    /// Starts sshd on a free loopback port, accepting public key logins
    /// (root included) with `authorized`, and waits until it sends its
    /// `SSH-2.0-` banner. Panics, with sshd's log, if it does not come up.
    pub fn start(authorized: &ClientKey) -> Sshd {
        ensure_privsep_dir();

        let dir = TempDir::new().expect("create temp dir for sshd");
        let host_key = dir.path().join("host_ed25519");
        keygen(&host_key, "matryoshka-test-host");
        let host_key_pub = {
            let line = read_public_line(&host_key);
            let mut fields = line.split_whitespace();
            match (fields.next(), fields.next()) {
                (Some(kind), Some(blob)) => format!("{kind} {blob}"),
                _ => panic!("malformed host public key line: {line:?}"),
            }
        };

        let authorized_keys = dir.path().join("authorized_keys");
        fs::write(&authorized_keys, format!("{}\n", authorized.public_line))
            .unwrap_or_else(|e| panic!("write {}: {e}", authorized_keys.display()));
        fs::set_permissions(&authorized_keys, fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("chmod 0600 {}: {e}", authorized_keys.display()));

        let config = dir.path().join("sshd_config");
        let pid_file = dir.path().join("sshd.pid");
        let log = dir.path().join("sshd.log");

        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port();
            write_config(&config, port, &host_key, &authorized_keys, &pid_file);
            let _ = fs::remove_file(&pid_file);

            let stderr = File::create(&log)
                .unwrap_or_else(|e| panic!("create sshd log {}: {e}", log.display()));
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(stderr))
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("start {SSHD} (is the openssh-server package installed?): {e}")
                });

            match wait_ready(&mut child, port, &pid_file) {
                Ok(()) => {
                    let known_hosts = dir.path().join("known_hosts");
                    fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_key_pub}\n"))
                        .unwrap_or_else(|e| panic!("write {}: {e}", known_hosts.display()));
                    return Sshd {
                        port,
                        host_key_pub,
                        known_hosts,
                        child,
                        dir,
                    };
                }
                Err(Failure::Exited(status)) => {
                    let text = read_log(&log);
                    if text.contains("Address already in use") && attempt < PORT_ATTEMPTS {
                        continue;
                    }
                    panic!(
                        "sshd exited early ({status}) on port {port}, attempt {attempt}; \
                         config {}; log:\n{text}",
                        config.display()
                    );
                }
                Err(Failure::Timeout(last)) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "sshd on port {port} not ready within {STARTUP_DEADLINE:?} \
                         (last problem: {last}); config {}; log:\n{}",
                        config.display(),
                        read_log(&log)
                    );
                }
            }
        }
        unreachable!("the last port attempt either returns or panics")
    }

    /// An OpenSSH client command that logs in as root with `key`, trusting
    /// only this server's host key, and runs `remote_cmd`:
    /// `ssh -p PORT -i KEY -o IdentitiesOnly=yes -o BatchMode=yes
    /// -o UserKnownHostsFile=KNOWN_HOSTS -o StrictHostKeyChecking=yes
    /// root@127.0.0.1 REMOTE_CMD`.
    pub fn ssh_command(&self, key: &ClientKey, remote_cmd: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-p")
            .arg(self.port.to_string())
            .arg("-i")
            .arg(&key.private_key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "root@127.0.0.1"])
            .arg(remote_cmd);
        cmd
    }

    /// The temporary directory holding sshd's config, keys and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What sshd has written to its stderr log so far (only errors, at `LogLevel ERROR`).
    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("sshd.log"))
    }
}

impl Drop for Sshd {
    /// Kills the listening sshd and reaps it; the temporary directory goes next.
    /// Per-connection sshd processes still serving an open client end with that client.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why sshd did not become ready.
enum Failure {
    /// It exited, with this status.
    Exited(std::process::ExitStatus),
    /// The deadline passed; the last thing that was not yet right.
    Timeout(String),
}

/// Waits until `child` has bound its port (it writes `pid_file` only after
/// that) and a connection to `port` gets an `SSH-2.0-` banner.
fn wait_ready(child: &mut Child, port: u16, pid_file: &Path) -> Result<(), Failure> {
    let deadline = Instant::now() + STARTUP_DEADLINE;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let own_pid = child.id().to_string();
    let mut last = String::from("nothing tried yet");
    loop {
        if let Some(status) = child.try_wait().expect("poll the sshd process") {
            return Err(Failure::Exited(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Failure::Timeout(last));
        }
        // The pid file proves the listener on `port` is this sshd and not
        // another process that took the port between our probe and its bind.
        match fs::read_to_string(pid_file) {
            Ok(pid) if pid.trim() == own_pid => match probe_banner(addr, deadline - now) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            },
            Ok(pid) => last = format!("pid file holds {:?}, sshd is {own_pid}", pid.trim()),
            Err(e) => last = format!("no pid file yet: {e}"),
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Connects to `addr` and reads the first line, which must be an SSH-2.0 banner.
fn probe_banner(addr: SocketAddr, left: Duration) -> Result<(), String> {
    let timeout = left
        .min(Duration::from_secs(2))
        .max(Duration::from_millis(10));
    let stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| format!("set read timeout: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("read banner from {addr}: {e}"))?;
    if line.starts_with("SSH-2.0-") {
        // Answer with our own identification before hanging up: a connection
        // closed before that makes sshd log a `kex_exchange_identification`
        // error, which would clutter the log shown when a test fails.
        let _ = reader.get_mut().write_all(b"SSH-2.0-matryoshka-probe\r\n");
        Ok(())
    } else {
        Err(format!("unexpected banner from {addr}: {line:?}"))
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local address of the probe listener")
        .port()
}

/// Writes the sshd configuration for one start attempt.
///
/// `SetEnv SHLVL=1` keeps Debian's bash from reading the login account's
/// `~/.bashrc` for each exec channel (it does so when it sees it was started by
/// sshd at shell level 1): the account the tests run as may have an expensive one
/// (on the benchmark machine, root's runs `pyenv init`: 140–380 ms per exec), and
/// the tests and benchmarks measure the relay, not the account's start-up files.
fn write_config(config: &Path, port: u16, host_key: &Path, authorized: &Path, pid_file: &Path) {
    let text = format!(
        "Port {port}\n\
         ListenAddress 127.0.0.1\n\
         HostKey {}\n\
         AuthorizedKeysFile {}\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PubkeyAuthentication yes\n\
         PermitRootLogin prohibit-password\n\
         StrictModes no\n\
         UsePAM no\n\
         PidFile {}\n\
         LogLevel ERROR\n\
         MaxSessions 100\n\
         MaxStartups 100:30:200\n\
         SetEnv SHLVL=1\n",
        host_key.display(),
        authorized.display(),
        pid_file.display(),
    );
    fs::write(config, text).unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
}

/// Creates sshd's privilege separation directory (root-owned, 0755) if missing.
fn ensure_privsep_dir() {
    match fs::DirBuilder::new().mode(0o755).create(PRIVSEP_DIR) {
        Ok(()) => fs::set_permissions(PRIVSEP_DIR, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod 0755 {PRIVSEP_DIR}: {e}")),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => panic!("create {PRIVSEP_DIR} (sshd needs it; are we root?): {e}"),
    }
}

/// Runs `ssh-keygen` for a passphrase-less ed25519 key at `path` (and `path.pub`).
fn keygen(path: &Path, comment: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run ssh-keygen (is openssh-client installed?): {e}"));
    assert!(
        out.status.success(),
        "ssh-keygen for {} failed ({}): {}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// The one-line public key written by `ssh-keygen` next to `private_key`.
fn read_public_line(private_key: &Path) -> String {
    let mut public = private_key.as_os_str().to_owned();
    public.push(".pub");
    let public = PathBuf::from(public);
    let text =
        fs::read_to_string(&public).unwrap_or_else(|e| panic!("read {}: {e}", public.display()));
    text.trim().to_owned()
}

/// The sshd log, or a note saying why it could not be read.
fn read_log(log: &Path) -> String {
    fs::read_to_string(log).unwrap_or_else(|e| format!("<cannot read {}: {e}>", log.display()))
}
