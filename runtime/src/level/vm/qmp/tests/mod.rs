use super::*;
use serde_json::Map;
use std::path::PathBuf;
use std::process::Stdio;
use tokio::io::AsyncBufReadExt;
use tokio::net::UnixListener;

const LONG: Duration = Duration::from_secs(20);

fn object(value: &Value) -> &Map<String, Value> {
    value.as_object().expect("a JSON object")
}

// ---- A fake QMP server on a unix socket ----

/// A listening socket in its own temporary folder.
struct Fake {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: UnixListener,
}

fn fake() -> Fake {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    Fake {
        _dir: dir,
        path,
        listener,
    }
}

/// The server's side of one connection.
struct Peer {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "test"}, "capabilities": ["oob"]}}"#;

impl Peer {
    async fn accept(listener: &UnixListener) -> Peer {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, write) = stream.into_split();
        Peer {
            read: BufReader::new(read),
            write,
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("server write");
    }

    async fn send(&mut self, value: Value) {
        let mut line = serde_json::to_vec(&value).expect("encode");
        line.extend_from_slice(b"\r\n");
        self.send_raw(&line).await;
    }

    /// The next request, or None at the end of the stream.
    async fn request(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = self.read.read_line(&mut line).await.expect("server read");
        (n > 0).then(|| serde_json::from_str(&line).expect("a JSON request"))
    }

    async fn expect_request(&mut self, command: &str) -> Value {
        let request = self.request().await.expect("a request");
        assert_eq!(request["execute"], command, "request {request}");
        request
    }

    /// Greets, and answers qmp_capabilities.
    async fn handshake(listener: &UnixListener) -> Peer {
        let mut peer = Peer::accept(listener).await;
        peer.send_raw(format!("{GREETING}\r\n").as_bytes()).await;
        let request = peer.expect_request("qmp_capabilities").await;
        assert_eq!(object(&request).len(), 2, "only execute and id: {request}");
        peer.send(json!({"return": {}, "id": request["id"]})).await;
        peer
    }

    async fn expect_end(&mut self) {
        let ended = tokio::time::timeout(Duration::from_secs(5), self.request()).await;
        assert!(
            matches!(ended, Ok(None)),
            "the client should have closed the socket"
        );
    }
}

async fn connect_fake(fake: &Fake) -> (Qmp, Peer) {
    let (qmp, peer) = tokio::join!(
        Qmp::connect(&fake.path, LONG),
        Peer::handshake(&fake.listener)
    );
    (qmp.expect("connect"), peer)
}

fn event(name: &str, data: Value) -> Value {
    json!({"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 2}})
}

mod fake_server;
mod real_qemu;
