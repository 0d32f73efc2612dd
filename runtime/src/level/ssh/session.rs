//! An SSH session to a level: pinned host key, the run's key, exec channels
//! whose output is pumped without stalling the session, and the guard that
//! ends it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Disconnect};
use tokio::io::AsyncWriteExt;

use super::known_hosts::{SshTarget, is_pinned};
use crate::config::SshSettings;
use crate::level::transport::{StderrTail, Transport, TransportGuard};

/// SSH keepalive interval.
const KEEPALIVE: Duration = Duration::from_secs(5);

pub(super) struct Pinned {
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

/// A started exec channel: its stdout as a reader, its stdin as a writer, and a
/// pump that keeps draining it (an undrained channel stalls the whole session).
pub(super) struct StartedChannel {
    pub reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    pub writer: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    exit: Arc<Mutex<Option<String>>>,
    tail: StderrTail,
    pump: tokio::task::JoinHandle<()>,
}

impl StartedChannel {
    pub fn into_transport(
        self,
        handle: Arc<Handle<Pinned>>,
        ssh_command: Option<String>,
    ) -> Transport {
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
            qmp: None,
            heartbeat_grace: None,
        }
    }
}

type WriteHalf = ChannelWriteHalf<client::Msg>;

/// Opens a channel and runs `cmd` in it.
async fn open_exec(
    handle: &Handle<Pinned>,
    cmd: &str,
    path: &str,
) -> Result<(ChannelReadHalf, WriteHalf), String> {
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
    Ok(channel.split())
}

pub(super) async fn start_channel(
    handle: &Handle<Pinned>,
    cmd: &str,
    path: &str,
) -> Result<StartedChannel, String> {
    let (rd, wr) = open_exec(handle, cmd, path).await?;
    Ok(pump(rd, wr, path, Vec::new(), StderrTail::default()))
}

/// Makes a started channel of `rd` and `wr`, whose stdout begins with `first`
/// (read from it already) and whose stderr so far is in `tail`.
fn pump(
    mut rd: ChannelReadHalf,
    wr: WriteHalf,
    path: &str,
    first: Vec<u8>,
    tail: StderrTail,
) -> StartedChannel {
    let writer = wr.make_writer();
    let (stdout_r, mut stdout_w) = tokio::io::simplex(256 << 10);
    let exit = Arc::new(Mutex::new(None::<String>));
    let pump = {
        let exit = exit.clone();
        let tail = tail.clone();
        let path = path.to_string();
        tokio::spawn(async move {
            let _write_half = wr;
            if stdout_w.write_all(&first).await.is_err() {
                return;
            }
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
    StartedChannel {
        reader: Box::new(stdout_r),
        writer: Box::new(writer),
        exit,
        tail,
        pump,
    }
}

/// What the first exec of a level answered.
pub(super) enum FirstAnswer {
    /// Its command became the runtime: the channel is the level's transport.
    Serving(StartedChannel),
    /// It printed the probe report that follows `mark` (and said why it
    /// ended, when it did).
    Probed {
        /// The report, without the mark's line.
        report: String,
        /// How the command ended and what it said on stderr, for errors.
        ended: String,
        /// The channel, still open, when the report's last line is
        /// `receiving`: the command waits for the runtime on its stdin.
        receiver: Option<Receiver>,
    },
}

/// A command waiting for input on its stdin ([`Receiver::feed`]). Dropping
/// it leaves the command waiting until the session ends: [`Receiver::hang_up`]
/// ends it.
pub(super) struct Receiver {
    rd: ChannelReadHalf,
    wr: WriteHalf,
    /// What the command wrote to stderr before it waited.
    said: Vec<u8>,
}

impl Receiver {
    /// Sends `stdin` and closes it; returns (exit status, stdout, stderr) of
    /// what the command said from now on (stderr from its start).
    pub async fn feed(self, stdin: bytes::Bytes) -> Result<(Option<u32>, String, String), String> {
        let said = String::from_utf8_lossy(&self.said).into_owned();
        let (status, out, err) = feed(self.rd, self.wr, "the first exec", Some(stdin)).await?;
        Ok((status, out, said + &err))
    }

    /// Closes the command's stdin and the channel: a command waiting for a
    /// runtime sees an empty one and keeps nothing.
    pub async fn hang_up(self) {
        let _ = self.wr.eof().await;
        let _ = self.wr.close().await;
    }
}

/// Runs `cmd` and reads its first answer: the runtime's own output (anything
/// that does not start with `mark` and a newline), or a probe report after
/// `mark`, read to the command's end or to a line starting with `receiving`.
/// At most 64 KiB of report.
pub(super) async fn first_exec(
    handle: &Handle<Pinned>,
    cmd: &str,
    path: &str,
    mark: &str,
    receiving: &str,
) -> Result<FirstAnswer, String> {
    let (mut rd, wr) = open_exec(handle, cmd, path).await?;
    let head = format!("{mark}\n");
    let (mut out, mut err, mut status) = (Vec::<u8>::new(), Vec::<u8>::new(), None);
    while let Some(msg) = rd.wait().await {
        match msg {
            ChannelMsg::Data { data } => out.extend_from_slice(&data),
            ChannelMsg::ExtendedData { data, ext: 1 } => err.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => {
                status = Some(format!("it exited with status {exit_status}"));
            }
            ChannelMsg::ExitSignal { signal_name, .. } => {
                status = Some(format!("it was killed by signal {signal_name:?}"));
            }
            ChannelMsg::Failure => return Err(format!("the server refused to run `{cmd}`")),
            _ => {}
        }
        if out.len() >= head.len() && !out.starts_with(head.as_bytes()) {
            let tail = tail_of(path, &err);
            return Ok(FirstAnswer::Serving(pump(rd, wr, path, out, tail)));
        }
        let report = &out[out.len().min(head.len())..];
        let waiting = report.ends_with(b"\n")
            && report
                .split(|b| *b == b'\n')
                .rev()
                .nth(1)
                .is_some_and(|last| last.starts_with(receiving.as_bytes()));
        if waiting || report.len() > 64 << 10 {
            let report = String::from_utf8_lossy(report).into_owned();
            let ended = tail_of(path, &err).explain(status.as_deref());
            let receiver = Receiver { rd, wr, said: err };
            let receiver = if waiting {
                Some(receiver)
            } else {
                receiver.hang_up().await;
                None
            };
            return Ok(FirstAnswer::Probed {
                report,
                ended,
                receiver,
            });
        }
    }
    let ended = tail_of(path, &err).explain(status.as_deref());
    match out.strip_prefix(head.as_bytes()) {
        Some(report) => Ok(FirstAnswer::Probed {
            report: String::from_utf8_lossy(report).into_owned(),
            ended,
            receiver: None,
        }),
        None => Err(format!("the target closed the channel at once{ended}")),
    }
}

/// The stderr tail of a channel whose stderr so far is `err`.
fn tail_of(path: &str, err: &[u8]) -> StderrTail {
    let tail = StderrTail::default();
    for line in String::from_utf8_lossy(err).lines() {
        tail.push(path, line);
    }
    tail
}

/// How the channel's command ended and what it last said on stderr, or empty.
fn describe(exit: &Mutex<Option<String>>, tail: &StderrTail) -> String {
    let exit = exit.lock().unwrap_or_else(|e| e.into_inner()).clone();
    tail.explain(exit.as_deref())
}

pub(super) async fn connect(
    target: &SshTarget,
    ssh: &SshSettings,
    patience: Duration,
) -> Result<(Handle<Pinned>, Arc<std::sync::atomic::AtomicBool>), String> {
    let Some(private) = &ssh.private_key else {
        return Err(format!(
            "the run's SSH key stays at L0: reaching {} from a level below needs \
             --hand-down-ssh-key (with a key made for this chain, never a personal one)",
            target.known_hosts_name()
        ));
    };
    let key = PrivateKey::from_openssh(private)
        .map_err(|e| format!("the run's SSH key is unusable: {e}"))?;
    let config = Arc::new(client::Config {
        preferred: preferred_algorithms(),
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

/// russh's algorithms, with AES-GCM first where the CPU has AES and carry-less
/// multiply instructions, as OpenSSH's client orders them there: with OpenSSH at
/// both ends it moved 28 MB in 120 ms against ChaCha20-Poly1305's 220 ms here
/// (through russh the cold hop showed no clear change on loopback, see
/// docs/benchmarks.md). Elsewhere ChaCha20 stays first: it is faster in software.
fn preferred_algorithms() -> russh::Preferred {
    let preferred = russh::Preferred::default();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq")
    {
        let mut ciphers = preferred.cipher.to_vec();
        ciphers.sort_by_key(|c| *c != russh::cipher::AES_256_GCM);
        return russh::Preferred {
            cipher: ciphers.into(),
            ..preferred
        };
    }
    preferred
}

/// Runs `cmd` in its own channel, feeding `stdin`; returns (exit status, stdout, stderr).
///
/// The answer is read while `stdin` is sent: a command that ends before it read
/// all of it (a refusal, a failed unpack) is heard, not waited on for a window
/// that never opens.
pub(super) async fn exec(
    handle: &Handle<Pinned>,
    cmd: &str,
    stdin: Option<bytes::Bytes>,
) -> Result<(Option<u32>, String, String), String> {
    let ch = handle
        .channel_open_session()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    ch.exec(true, cmd)
        .await
        .map_err(|e| format!("exec failed: {e}"))?;
    let (read, write) = ch.split();
    feed(read, write, cmd, stdin).await
}

/// Sends `stdin` to the command of a channel and closes it, while reading its
/// answer: (exit status, stdout, stderr). `cmd` names it in errors.
async fn feed(
    mut read: ChannelReadHalf,
    write: WriteHalf,
    cmd: &str,
    stdin: Option<bytes::Bytes>,
) -> Result<(Option<u32>, String, String), String> {
    let started = std::time::Instant::now();
    let size = stdin.as_ref().map(bytes::Bytes::len);
    let send = async move {
        if let Some(bytes) = stdin {
            // Owned bytes go out in packets of the peer's maximum size; `data` would
            // copy them through an 8 KiB buffer, a packet each (22 MB/s to OpenSSH here).
            write
                .data_bytes(bytes)
                .await
                .map_err(|e| format!("sending data failed: {e}"))?;
        }
        write
            .eof()
            .await
            .map_err(|e| format!("closing stdin failed: {e}"))?;
        // Kept until the answer is read: dropping the last sender closes the channel.
        Ok::<_, String>((write, started.elapsed()))
    };
    let answer = async {
        let (mut out, mut err, mut status) = (Vec::new(), Vec::new(), None);
        while let Some(msg) = read.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, ext: 1 } => err.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::Failure => return Err(format!("the server refused to run `{cmd}`")),
                _ => {}
            }
        }
        Ok((status, out, err))
    };
    tokio::pin!(send, answer);
    let (sent, answered) = tokio::select! {
        sent = &mut send => (Some(sent), answer.await),
        answered = &mut answer => (None, answered),
    };
    let (status, out, err) = answered?;
    if let (Some(size), Some(Ok((_, sent_in)))) = (size, &sent) {
        tracing::info!(
            "sent {size} bytes in {} ms; the command answered after {} ms",
            sent_in.as_millis(),
            started.elapsed().as_millis()
        );
    }
    // A command that exited said why; a send that failed otherwise is the error.
    if status.is_none()
        && let Some(Err(e)) = sent
    {
        return Err(e);
    }
    Ok((
        status,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    ))
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
