//! SSH levels: copy the runtime there (once per hash), then run `serve --stdio`
//! in an exec channel.
//!
//! Host keys are pinned: the server's key must match a `known_hosts` entry the
//! run was given, never learned on first use. Authentication uses the run's key.
//!
//! Self-replication, per hop:
//! 1. one exec channel probes the target: `uname -m`, the cache folder, and the
//!    runtimes already there (`matryoshka-<sha256>`);
//! 2. if the runtime for that architecture is missing, a second channel streams
//!    it gzip-compressed into a temporary file that is renamed into place only
//!    when complete (an interrupted upload leaves nothing behind); the
//!    compressed copy is kept beside it so the next hop sends it without
//!    compressing again;
//! 3. a third channel runs `<cache>/bin/matryoshka-<sha256> serve --stdio`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{StderrTail, Transport, TransportGuard};
use crate::relay::protocol::{LevelSetup, RemoteError, SshSettings, WireErrorKind};

/// How long an SSH level has to accept the connection and authenticate.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// SSH keepalive interval.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long an SSH server may leave keepalives unanswered before the session is dropped.
const PATIENCE: Duration = Duration::from_secs(15);
/// How long the probe of a target may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long copying the runtime to a target may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// A runtime binary to send: its hash, and its gzip-compressed bytes made on
/// first use (a warm hop only needs the hash).
pub struct RuntimeImage {
    /// Hex sha256 of the uncompressed binary.
    pub sha256: String,
    path: PathBuf,
    gz: OnceLock<Result<Arc<Vec<u8>>, String>>,
}

impl RuntimeImage {
    /// The binary.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The binary, gzip-compressed; a `.gz` copy beside it is used when present.
    pub fn gz(&self) -> Result<Arc<Vec<u8>>, String> {
        self.gz
            .get_or_init(|| {
                let companion = PathBuf::from(format!("{}.gz", self.path.display()));
                if let Ok(gz) = std::fs::read(&companion) {
                    return Ok(Arc::new(gz));
                }
                let bytes = std::fs::read(&self.path)
                    .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(&bytes)
                    .and_then(|()| enc.finish())
                    .map(Arc::new)
                    .map_err(|e| format!("cannot compress the runtime: {e}"))
            })
            .clone()
    }
}

/// The sha256 of this runtime when its file name carries it (`matryoshka-<sha256>`),
/// as it does on every level it was copied to.
pub fn own_sha_from_name() -> Option<String> {
    let exe = super::own_exe().ok()?;
    sha_from_name(&exe)
}

fn sha_from_name(path: &std::path::Path) -> Option<String> {
    let sha = path.file_name()?.to_str()?.strip_prefix("matryoshka-")?;
    (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit())).then(|| sha.to_string())
}

/// This runtime's own image, computed once per process.
pub fn own_image() -> Result<Arc<RuntimeImage>, String> {
    static IMAGE: OnceLock<Arc<RuntimeImage>> = OnceLock::new();
    if let Some(image) = IMAGE.get() {
        return Ok(image.clone());
    }
    let exe = super::own_exe().map_err(|e| format!("cannot find this runtime's binary: {e}"))?;
    let image = Arc::new(image_of(&exe)?);
    Ok(IMAGE.get_or_init(|| image).clone())
}

/// The image of the runtime binary at `path`. Its hash comes from its name when
/// it carries one, else from a hash remembered per size and mtime in the cache.
pub fn image_of(path: &std::path::Path) -> Result<RuntimeImage, String> {
    let sha256 = match sha_from_name(path) {
        Some(sha) => sha,
        None => remembered_sha(path)?,
    };
    Ok(RuntimeImage {
        sha256,
        path: path.to_path_buf(),
        gz: OnceLock::new(),
    })
}

fn remembered_sha(path: &std::path::Path) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let memo = match crate::engine::CacheDir::default_location() {
        crate::engine::CacheDir::At(dir) => Some(
            dir.join("self")
                .join(format!("{}-{mtime}.sha256", meta.len())),
        ),
        crate::engine::CacheDir::Disabled => None,
    };
    if let Some(sha) = memo.as_ref().and_then(|m| std::fs::read_to_string(m).ok()) {
        return Ok(sha.trim().to_string());
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let sha = crate::engine::sha256_hex(&bytes);
    if let Some(memo) = memo
        && let Some(dir) = memo.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        let _ = std::fs::write(memo, &sha);
    }
    Ok(sha)
}

/// The image to send to a level of architecture `arch`: the build in
/// `$MATRYOSHKA_RUNTIME_DIR/<arch>/matryoshka` when there is one (e.g. a release
/// build, small to copy, driven by a debug build at L0), else this runtime itself
/// when the architecture matches.
pub fn image_for(arch: &str) -> Result<Arc<RuntimeImage>, String> {
    static CHOSEN: OnceLock<Mutex<std::collections::HashMap<String, Arc<RuntimeImage>>>> =
        OnceLock::new();
    let chosen = CHOSEN.get_or_init(Mutex::default);
    if let Some(image) = chosen.lock().unwrap_or_else(|e| e.into_inner()).get(arch) {
        return Ok(image.clone());
    }
    let dir = std::env::var_os("MATRYOSHKA_RUNTIME_DIR").map(PathBuf::from);
    let candidate = dir.as_ref().map(|d| d.join(arch).join("matryoshka"));
    let image = match candidate {
        Some(path) if path.exists() => Arc::new(image_of(&path)?),
        _ if arch == std::env::consts::ARCH => own_image()?,
        _ => {
            return Err(format!(
                "the level is {arch} but this runtime is {}, and no {arch} runtime was found{}: build one \
             with `cargo build --release --target {arch}-unknown-linux-gnu -p matryoshka` and put it at \
             $MATRYOSHKA_RUNTIME_DIR/{arch}/matryoshka",
                std::env::consts::ARCH,
                candidate
                    .map(|p| format!(" at {}", p.display()))
                    .unwrap_or_else(|| " ($MATRYOSHKA_RUNTIME_DIR is not set)".into())
            ));
        }
    };
    chosen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(arch.to_string(), image.clone());
    Ok(image)
}

/// `user@host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// Login name.
    pub user: String,
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl SshTarget {
    /// Parses the part after `ssh://`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (user, rest) = spec.split_once('@').ok_or_else(|| {
            format!("`ssh://{spec}` has no user: expected ssh://user@host[:port]")
        })?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("bad port `{p}` in ssh://{spec}"))?,
            ),
            None => (rest, 22),
        };
        if user.is_empty() || host.is_empty() {
            return Err(format!("`ssh://{spec}`: expected ssh://user@host[:port]"));
        }
        Ok(Self {
            user: user.into(),
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port,
        })
    }

    fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }
}

/// Whether `key` is pinned for `target` in `known_hosts` (OpenSSH format, plain host names).
pub fn is_pinned(known_hosts: &str, target: &SshTarget, key: &PublicKey) -> bool {
    let name = target.known_hosts_name();
    known_hosts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (Some(hosts), Some(algo), Some(b64)) = (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        hosts.split(',').any(|h| h == name)
            && PublicKey::from_openssh(&format!("{algo} {b64}"))
                .is_ok_and(|pinned| pinned.key_data() == key.key_data())
    })
}

struct Pinned {
    target: SshTarget,
    known_hosts: String,
    presented: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = key.public_key();
        if let Ok(line) = key.to_openssh() {
            *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(line);
        }
        Ok(is_pinned(&self.known_hosts, &self.target, &key))
    }
}

/// Connects with `ssh`'s key and pinned host keys, copies the runtime if needed,
/// and starts it serving.
pub async fn open(
    spec: &str,
    setup: &LevelSetup,
    ssh: &SshSettings,
) -> Result<Transport, RemoteError> {
    let err = |kind: WireErrorKind, message: String| RemoteError {
        kind,
        message: format!("{message} (reaching {} at ssh://{spec})", setup.path),
        level_path: setup.path.clone(),
    };
    let target = SshTarget::parse(spec).map_err(|m| err(WireErrorKind::InvalidArgument, m))?;
    let started = std::time::Instant::now();
    let (handle, quick_ack) =
        tokio::time::timeout(CONNECT_TIMEOUT, connect(&target, ssh, PATIENCE))
            .await
            .map_err(|_| {
                err(
                    WireErrorKind::Timeout,
                    format!("no SSH session within {} s", CONNECT_TIMEOUT.as_secs()),
                )
            })?
            .map_err(|m| err(WireErrorKind::Io, m))?;
    let handle = Arc::new(handle);
    let session_ms = started.elapsed().as_millis();

    let cache = ssh
        .remote_cache_dir
        .as_deref()
        .map(|d| remote_path(&d.replace("{depth}", &setup.depth.to_string())))
        .unwrap_or_else(|| "\"$HOME/.cache/matryoshka\"".into());
    // Warm path, one exec: if this runtime is already cached there (same arch, same
    // hash), the script becomes it and speaks the protocol at once. Otherwise it
    // prints a probe report: arch, cache folder, the runtimes it has.
    let own = tokio::task::spawn_blocking(|| image_for(std::env::consts::ARCH))
        .await
        .map_err(|e| err(WireErrorKind::Internal, e.to_string()))?
        .map_err(|m| err(WireErrorKind::Unsupported, m))?;
    let first = format!(
        "D={cache}; B=\"$D/bin/matryoshka-{sha}\"; \
         if [ \"$(uname -m)\" = {arch} ] && [ -x \"$B\" ]; then exec \"$B\"{verbose} serve --stdio --cache-dir \"$D\"; fi; \
         echo {PROBE_MARK}; mkdir -p \"$D/bin\" && uname -m && echo \"$D\" && ls \"$D/bin\"",
        sha = own.sha256,
        arch = sh_quote(std::env::consts::ARCH),
        verbose = super::verbosity_flag(),
    );
    let mut chan = tokio::time::timeout(EXEC_TIMEOUT, start_channel(&handle, &first, &setup.path))
        .await
        .map_err(|_| {
            err(
                WireErrorKind::Timeout,
                format!("no answer within {} s", EXEC_TIMEOUT.as_secs()),
            )
        })?
        .map_err(|m| err(WireErrorKind::Io, m))?;
    let mut head = vec![0u8; PROBE_MARK.len() + 1];
    let got = tokio::time::timeout(EXEC_TIMEOUT, chan.reader.read_exact(&mut head)).await;
    if !matches!(got, Ok(Ok(_))) {
        return Err(err(
            WireErrorKind::Io,
            format!("the target closed the channel at once{}", chan.describe()),
        ));
    }
    if head != format!("{PROBE_MARK}\n").as_bytes() {
        tracing::info!(level = %setup.path, "ssh://{spec}: cached runtime started after {} ms", started.elapsed().as_millis());
        quick_ack.store(false, std::sync::atomic::Ordering::Relaxed);
        chan.reader = Box::new(std::io::Cursor::new(head).chain(chan.reader));
        return Ok(chan.into_transport(handle, ssh_command(ssh, &target)));
    }
    let mut report = String::new();
    let _ = tokio::time::timeout(EXEC_TIMEOUT, chan.reader.read_to_string(&mut report)).await;
    let probe_failed = chan.describe();
    drop(chan);
    let mut lines = report.lines();
    let arch = lines.next().unwrap_or_default().trim().to_string();
    if arch.is_empty() || !arch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(err(
            WireErrorKind::Unsupported,
            format!("probing the target failed (architecture `{arch}`){probe_failed}"),
        ));
    }
    let dir = lines.next().unwrap_or_default().trim().to_string();
    let present: Vec<&str> = lines.collect();
    let image = {
        let arch = arch.clone();
        tokio::task::spawn_blocking(move || image_for(&arch))
            .await
            .map_err(|e| err(WireErrorKind::Internal, e.to_string()))?
            .map_err(|m| err(WireErrorKind::Unsupported, m))?
    };
    let name = format!("matryoshka-{}", image.sha256);
    let remote_bin = format!("{dir}/bin/{name}");
    if !present.contains(&name.as_str()) {
        let gz = {
            let image = image.clone();
            tokio::task::spawn_blocking(move || image.gz())
                .await
                .map_err(|e| err(WireErrorKind::Internal, e.to_string()))?
                .map_err(|m| err(WireErrorKind::Io, m))?
        };
        tracing::info!(level = %setup.path, "copying the runtime ({} bytes compressed) to {remote_bin}", gz.len());
        let upload = format!(
            "set -e; B={bin}; T=$(mktemp \"$B.XXXXXX\"); G=$(mktemp \"$B.gz.XXXXXX\"); \
             trap 'rm -f \"$T\" \"$G\"' EXIT; cat > \"$G\"; gzip -dc < \"$G\" > \"$T\"; chmod 755 \"$T\"; \
             mv \"$G\" \"$B.gz\"; mv \"$T\" \"$B\"; trap - EXIT",
            bin = sh_quote(&remote_bin)
        );
        let (status, _, stderr) =
            tokio::time::timeout(UPLOAD_TIMEOUT, exec(&handle, &upload, Some(&gz)))
                .await
                .map_err(|_| {
                    err(
                        WireErrorKind::Timeout,
                        format!(
                            "copying the runtime took over {} s",
                            UPLOAD_TIMEOUT.as_secs()
                        ),
                    )
                })?
                .map_err(|m| err(WireErrorKind::Io, m))?;
        if status != Some(0) {
            return Err(err(
                WireErrorKind::Io,
                format!("copying the runtime failed: {}", stderr.trim()),
            ));
        }
    }
    tracing::info!(
        level = %setup.path,
        "ssh://{spec}: session {session_ms} ms, probe and copy done at {} ms",
        started.elapsed().as_millis()
    );
    let serve = format!(
        "exec {}{} serve --stdio --cache-dir {}",
        sh_quote(&remote_bin),
        super::verbosity_flag(),
        sh_quote(&dir)
    );
    let chan = start_channel(&handle, &serve, &setup.path)
        .await
        .map_err(|m| err(WireErrorKind::Io, format!("cannot start the runtime: {m}")))?;
    quick_ack.store(false, std::sync::atomic::Ordering::Relaxed);
    Ok(chan.into_transport(handle, ssh_command(ssh, &target)))
}

/// What the first line of the first exec says when the runtime is not cached.
const PROBE_MARK: &str = "MATRYOSHKA-PROBE";

/// A started exec channel: its stdout as a reader, its stdin as a writer, and a
/// pump that keeps draining it (an undrained channel stalls the whole session).
struct StartedChannel {
    reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    writer: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    exit: Arc<Mutex<Option<String>>>,
    tail: StderrTail,
    pump: tokio::task::JoinHandle<()>,
}

impl StartedChannel {
    fn describe(&self) -> String {
        describe(&self.exit, &self.tail)
    }

    fn into_transport(self, handle: Arc<Handle<Pinned>>, ssh_command: Option<String>) -> Transport {
        Transport {
            reader: self.reader,
            writer: self.writer,
            guard: Box::new(SshGuard {
                handle: Some(handle),
                pump: self.pump,
                exit: self.exit,
                tail: self.tail,
            }),
            ssh_command,
            vm: None,
            heartbeat_grace: None,
        }
    }
}

async fn start_channel(
    handle: &Handle<Pinned>,
    cmd: &str,
    path: &str,
) -> Result<StartedChannel, String> {
    let started = std::time::Instant::now();
    let channel = handle
        .channel_open_session()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    let opened = started.elapsed();
    channel
        .exec(true, cmd)
        .await
        .map_err(|e| format!("exec failed: {e}"))?;
    tracing::debug!(
        level = %path,
        "channel open {} µs, exec sent {} µs",
        opened.as_micros(),
        started.elapsed().as_micros()
    );
    let (mut rd, wr) = channel.split();
    let writer = wr.make_writer();
    let (stdout_r, mut stdout_w) = tokio::io::simplex(256 << 10);
    let exit = Arc::new(Mutex::new(None::<String>));
    let tail = StderrTail::default();
    let pump = {
        let exit = exit.clone();
        let tail = tail.clone();
        let path = path.to_string();
        tokio::spawn(async move {
            let _write_half = wr;
            while let Some(msg) = rd.wait().await {
                match msg {
                    ChannelMsg::Data { data } if stdout_w.write_all(&data).await.is_err() => break,
                    ChannelMsg::Data { .. } => {}
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        for line in String::from_utf8_lossy(&data).lines() {
                            tail.push(&path, line);
                        }
                    }
                    ChannelMsg::ExitStatus { exit_status } => {
                        *exit.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(format!("its runtime exited with status {exit_status}"));
                    }
                    ChannelMsg::ExitSignal { signal_name, .. } => {
                        *exit.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(format!("its runtime was killed by signal {signal_name:?}"));
                    }
                    _ => {}
                }
            }
            let _ = stdout_w.shutdown().await;
        })
    };
    Ok(StartedChannel {
        reader: Box::new(stdout_r),
        writer: Box::new(writer),
        exit,
        tail,
        pump,
    })
}

/// How the channel's command ended and what it last said on stderr, or empty.
fn describe(exit: &Mutex<Option<String>>, tail: &StderrTail) -> String {
    let exit = exit.lock().unwrap_or_else(|e| e.into_inner()).clone();
    tail.explain(exit.as_deref())
}

fn ssh_command(ssh: &SshSettings, target: &SshTarget) -> Option<String> {
    Some(match &ssh.key_path {
        Some(key) => format!(
            "ssh -i {} -p {} {}@{}",
            sh_quote(key),
            target.port,
            target.user,
            target.host
        ),
        None => format!("ssh -p {} {}@{}", target.port, target.user, target.host),
    })
}

async fn connect(
    target: &SshTarget,
    ssh: &SshSettings,
    patience: Duration,
) -> Result<(Handle<Pinned>, Arc<std::sync::atomic::AtomicBool>), String> {
    let key = PrivateKey::from_openssh(&ssh.private_key)
        .map_err(|e| format!("the run's SSH key is unusable: {e}"))?;
    let config = Arc::new(client::Config {
        nodelay: true,
        keepalive_interval: Some(KEEPALIVE),
        keepalive_max: usize::try_from(patience.as_secs() / KEEPALIVE.as_secs())
            .unwrap_or(3)
            .max(3),
        ..Default::default()
    });
    let presented = Arc::new(Mutex::new(None));
    let handler = Pinned {
        target: target.clone(),
        known_hosts: ssh.known_hosts.clone(),
        presented: presented.clone(),
    };
    let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", target.host, target.port))?;
    let _ = stream.set_nodelay(true);
    let quick_ack = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let stream = QuickAck {
        stream,
        on: quick_ack.clone(),
    };
    let mut handle = match client::connect_stream(config, stream, handler).await {
        Ok(h) => h,
        Err(russh::Error::UnknownKey) => {
            let shown = presented
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default();
            return Err(format!(
                "host key of {} is not pinned for this run (it presented `{shown}`); add the line \
                 `{} {shown}` to the file given with --ssh-known-hosts",
                target.known_hosts_name(),
                target.known_hosts_name()
            ));
        }
        Err(e) => {
            return Err(format!(
                "SSH handshake with {}:{} failed: {e}",
                target.host, target.port
            ));
        }
    };
    let auth = handle
        .authenticate_publickey(
            &target.user,
            PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .map_err(|e| format!("authentication failed: {e}"))?;
    if !auth.success() {
        return Err(format!(
            "{}@{} refused the run's key: add its public key to ~{}/.ssh/authorized_keys there",
            target.user, target.host, target.user
        ));
    }
    Ok((handle, quick_ack))
}

/// A TCP stream that acknowledges what it receives at once (`TCP_QUICKACK` after
/// every read) while `on` is set: while the session is set up. OpenSSH's sshd
/// leaves Nagle's algorithm on until a session starts and sends its
/// post-authentication messages as separate small segments: with this side's ACKs
/// delayed (up to 40 ms on Linux), the second one waited for the first one's ACK,
/// and every new connection paid ~43 ms before its channel opened. Once the runtime
/// runs there, frames go both ways and ACKs ride on them as usual.
struct QuickAck {
    stream: tokio::net::TcpStream,
    on: Arc<std::sync::atomic::AtomicBool>,
}

impl QuickAck {
    fn ack_now(&self) {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: setsockopt(2) on this stream's own socket with a valid int option;
        // the kernel copies the value before returning.
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && self.on.load(std::sync::atomic::Ordering::Relaxed)
        {
            // Linux falls back to delayed ACKs after a while: ask again after each read.
            self.ack_now();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Runs `cmd` in its own channel, feeding `stdin`; returns (exit status, stdout, stderr).
async fn exec(
    handle: &Handle<Pinned>,
    cmd: &str,
    stdin: Option<&[u8]>,
) -> Result<(Option<u32>, String, String), String> {
    let mut ch = handle
        .channel_open_session()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    ch.exec(true, cmd)
        .await
        .map_err(|e| format!("exec failed: {e}"))?;
    if let Some(bytes) = stdin {
        ch.data(bytes)
            .await
            .map_err(|e| format!("sending data failed: {e}"))?;
    }
    ch.eof()
        .await
        .map_err(|e| format!("closing stdin failed: {e}"))?;
    let (mut out, mut err, mut status) = (Vec::new(), Vec::new(), None);
    while let Some(msg) = ch.wait().await {
        match msg {
            ChannelMsg::Data { data } => out.extend_from_slice(&data),
            ChannelMsg::ExtendedData { data, ext: 1 } => err.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            ChannelMsg::Failure => return Err(format!("the server refused to run `{cmd}`")),
            _ => {}
        }
    }
    Ok((
        status,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    ))
}

/// Quotes a remote path for a POSIX shell, keeping a leading `~/` meaning `$HOME/`.
fn remote_path(path: &str) -> String {
    match path.strip_prefix("~/") {
        Some(rest) => format!("\"$HOME\"/{}", sh_quote(rest)),
        None => sh_quote(path),
    }
}

/// Quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

struct SshGuard {
    handle: Option<Arc<Handle<Pinned>>>,
    pump: tokio::task::JoinHandle<()>,
    exit: Arc<Mutex<Option<String>>>,
    tail: StderrTail,
}

impl Drop for SshGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl TransportGuard for SshGuard {
    fn shutdown(&mut self) {
        self.pump.abort();
        if let Some(handle) = self.handle.take() {
            // Closing the session closes the runtime's stdin there, which ends it.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
                });
            }
        }
    }

    fn describe_exit(&mut self) -> String {
        describe(&self.exit, &self.tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = SshTarget::parse("root@127.0.0.1:2222").expect("valid");
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port),
            ("root", "127.0.0.1", 2222)
        );
        assert_eq!(t.known_hosts_name(), "[127.0.0.1]:2222");
        let t = SshTarget::parse("me@lab").expect("valid");
        assert_eq!(t.port, 22);
        assert_eq!(t.known_hosts_name(), "lab");
        assert!(SshTarget::parse("lab").is_err());
        assert!(SshTarget::parse("me@lab:x").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
