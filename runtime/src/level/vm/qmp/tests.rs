use super::*;
use std::path::PathBuf;
use std::process::Stdio;
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

#[test]
fn qmp_is_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Qmp>();
    check::<QmpError>();
}

#[tokio::test]
async fn fake_handshake_gives_the_version() {
    let fake = fake();
    let (qmp, _peer) = connect_fake(&fake).await;
    assert_eq!(qmp.qemu_version(), "7.2.22");
    assert!(format!("{qmp:?}").contains("7.2.22"));
}

#[tokio::test]
async fn replies_out_of_order_are_matched_by_id() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let server = async {
        let first = peer.request().await.expect("first");
        let second = peer.request().await.expect("second");
        assert_ne!(first["id"], second["id"]);
        // Answer the second first; each reply names its own command.
        for request in [&second, &first] {
            peer.send(json!({"id": request["id"], "return": {"for": request["execute"]}}))
                .await;
        }
        peer
    };
    let (a, b, _peer) = tokio::join!(
        qmp.execute("cmd-a", None, LONG),
        qmp.execute("cmd-b", Some(json!({"x": 1})), LONG),
        server
    );
    assert_eq!(a.expect("a"), json!({"for": "cmd-a"}));
    assert_eq!(b.expect("b"), json!({"for": "cmd-b"}));
    assert_eq!(qmp.pending_len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_callers_each_get_their_reply() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let qmp = Arc::new(qmp);
    let server = tokio::spawn(async move {
        let mut requests = Vec::new();
        for _ in 0..50 {
            requests.push(peer.request().await.expect("request"));
        }
        requests.reverse();
        for request in requests {
            let n = request["arguments"]["n"].clone();
            peer.send(json!({"return": {"n": n}, "id": request["id"]}))
                .await;
        }
        peer
    });
    let callers: Vec<_> = (0..50)
        .map(|n| {
            let qmp = Arc::clone(&qmp);
            tokio::spawn(async move {
                let reply = qmp.execute("echo", Some(json!({"n": n})), LONG).await;
                assert_eq!(reply.expect("reply"), json!({"n": n}));
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("caller");
    }
    let _peer = server.await.expect("server");
}

#[tokio::test]
async fn command_and_arguments_are_not_spliced() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let command = "a\",\"execute\":\"quit";
    let arguments = json!({"s": "x\"}\n{\"execute\":\"quit\"}", "n": [1, 2]});
    let server = async {
        let mut line = String::new();
        peer.read.read_line(&mut line).await.expect("read");
        assert_eq!(line.matches('\n').count(), 1, "one line: {line:?}");
        let request: Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(request["execute"], command);
        assert_eq!(request["arguments"], arguments);
        assert!(request["id"].is_u64());
        assert_eq!(object(&request).len(), 3);
        peer.send(json!({"return": {}, "id": request["id"]})).await;
    };
    let (reply, ()) = tokio::join!(qmp.execute(command, Some(arguments.clone()), LONG), server);
    assert_eq!(reply.expect("reply"), json!({}));
}

#[tokio::test]
async fn error_replies() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let server = async {
        let r = peer.request().await.expect("request");
        peer.send(json!({"id": r["id"], "error": {"class": "GenericError", "desc": "no"}}))
            .await;
        let r = peer.request().await.expect("request");
        peer.send(json!({"id": r["id"], "error": {"class": "GenericError"}}))
            .await;
        let r = peer.request().await.expect("request");
        peer.send(json!({"id": r["id"], "return": [1]})).await;
    };
    let client = async {
        let refused = qmp.execute("one", None, LONG).await;
        assert_eq!(
            refused,
            Err(QmpError::Qemu {
                class: "GenericError".into(),
                desc: "no".into()
            })
        );
        // A malformed error fails its caller only; the connection goes on.
        let malformed = qmp.execute("two", None, LONG).await;
        assert!(
            matches!(&malformed, Err(QmpError::Protocol(m)) if m.contains("without a class and a desc")),
            "{malformed:?}"
        );
        assert_eq!(qmp.execute("three", None, LONG).await, Ok(json!([1])));
    };
    tokio::join!(server, client);
}

#[tokio::test]
async fn an_event_received_before_wait_event_is_returned() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let server = async {
        let r = peer.request().await.expect("request");
        peer.send(event("OTHER", json!({"n": 0}))).await;
        peer.send(event("WANTED", json!({"n": 1}))).await;
        peer.send(event("WANTED", json!({"n": 2}))).await;
        peer.send(json!({"id": r["id"], "return": {}})).await;
    };
    let (reply, ()) = tokio::join!(qmp.execute("ping", None, LONG), server);
    reply.expect("ping");
    // The events came before the reply, so they are queued: no waiting needed.
    let first = qmp
        .wait_event("WANTED", Duration::ZERO)
        .await
        .expect("first");
    assert_eq!(first, event("WANTED", json!({"n": 1})));
    let second = qmp
        .wait_event("WANTED", Duration::ZERO)
        .await
        .expect("second");
    assert_eq!(second["data"]["n"], 2);
    let third = qmp.wait_event("WANTED", Duration::from_millis(50)).await;
    assert!(
        matches!(&third, Err(QmpError::Timeout(m)) if m.contains("WANTED")),
        "{third:?}"
    );
    let other = qmp
        .wait_event("OTHER", Duration::ZERO)
        .await
        .expect("other");
    assert_eq!(other["data"]["n"], 0);
    assert_eq!(qmp.queued_events(), (0, 0));
}

#[tokio::test]
async fn wait_event_waits_for_a_later_event() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let waiter = qmp.wait_event("LATER", LONG);
    let server = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peer.send(event("NOISE", json!({}))).await;
        peer.send(event("LATER", json!({"ok": true}))).await;
    };
    let (got, ()) = tokio::join!(waiter, server);
    assert_eq!(got.expect("event")["data"]["ok"], true);
}

/// Waiters on other threads racing events as they arrive: none is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_other_threads_see_every_event() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let qmp = Arc::new(qmp);
    let rounds = 200;
    let waiters: Vec<_> = (0..rounds)
        .map(|_| {
            let qmp = Arc::clone(&qmp);
            tokio::spawn(async move { qmp.wait_event("TICK", LONG).await })
        })
        .collect();
    for n in 0..rounds {
        peer.send(event("TICK", json!({"n": n}))).await;
        if n % 10 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let mut seen = Vec::new();
    for waiter in waiters {
        let tick = waiter.await.expect("waiter").expect("TICK");
        seen.push(tick["data"]["n"].as_u64().expect("n"));
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..rounds).collect::<Vec<u64>>());
    assert_eq!(qmp.queued_events(), (0, 0));
}

#[tokio::test]
async fn the_event_queue_is_bounded_by_count() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let extra = 6;
    let server = async {
        let r = peer.request().await.expect("request");
        let mut batch = Vec::new();
        for n in 0..MAX_QUEUED_EVENTS + extra {
            batch.extend(serde_json::to_vec(&event("E", json!({"n": n}))).expect("encode"));
            batch.push(b'\n');
        }
        peer.send_raw(&batch).await;
        peer.send(json!({"id": r["id"], "return": {}})).await;
    };
    let (reply, ()) = tokio::join!(qmp.execute("ping", None, LONG), server);
    reply.expect("ping");
    assert_eq!(qmp.queued_events().0, MAX_QUEUED_EVENTS);
    let oldest = qmp.wait_event("E", Duration::ZERO).await.expect("oldest");
    assert_eq!(
        oldest["data"]["n"], extra,
        "the oldest {extra} were dropped"
    );
}

#[tokio::test]
async fn the_event_queue_is_bounded_by_bytes() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let big = "b".repeat(6 * 1024 * 1024);
    let server = async {
        let r = peer.request().await.expect("request");
        for n in 0..3 {
            peer.send(event("BIG", json!({"n": n, "pad": big}))).await;
        }
        peer.send(json!({"id": r["id"], "return": {}})).await;
    };
    let (reply, ()) = tokio::join!(qmp.execute("ping", None, LONG), server);
    reply.expect("ping");
    let (count, bytes) = qmp.queued_events();
    assert_eq!(count, 2);
    assert!(bytes <= MAX_QUEUED_EVENT_BYTES, "{bytes}");
    let oldest = qmp.wait_event("BIG", Duration::ZERO).await.expect("big");
    assert_eq!(oldest["data"]["n"], 1);
}

/// A reply line of exactly `len` bytes before its newline.
fn reply_of_len(id: &Value, len: usize) -> Vec<u8> {
    let head = format!("{{\"id\": {id}, \"return\": \"");
    let tail = "\"}";
    let mut line = head.into_bytes();
    line.resize(len - tail.len(), b'a');
    line.extend_from_slice(tail.as_bytes());
    assert_eq!(line.len(), len);
    line.push(b'\n');
    line
}

#[tokio::test]
async fn a_line_of_the_bound_is_read_and_a_longer_one_is_refused() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let server = async {
        let r = peer.request().await.expect("request");
        peer.send_raw(&reply_of_len(&r["id"], MAX_LINE)).await;
        let r = peer.request().await.expect("request");
        peer.send_raw(&reply_of_len(&r["id"], MAX_LINE + 1)).await;
        // The client closes the connection.
        peer.expect_end().await;
    };
    let client = async {
        let fits = qmp.execute("fits", None, LONG).await.expect("fits");
        let fits = fits.as_str().expect("a string");
        assert!(fits.len() > MAX_LINE - 40 && fits.bytes().all(|b| b == b'a'));
        let refused = qmp.execute("too-long", None, LONG).await;
        assert!(
            matches!(&refused, Err(QmpError::Protocol(m)) if m.contains("longer than")),
            "{refused:?}"
        );
        // Later calls are told the same.
        let later = qmp.execute("later", None, LONG).await;
        assert_eq!(later, refused);
        let event = qmp.wait_event("ANY", LONG).await;
        assert_eq!(event.err(), refused.err());
    };
    tokio::join!(server, client);
}

#[tokio::test]
async fn a_line_that_is_not_qmp_ends_the_connection() {
    for bad in [
        &b"hello\n"[..],
        b"[1, 2]\n",
        b"{\"x\": 1}\n",
        b"{\"event\": 7}\n",
    ] {
        let fake = fake();
        let (qmp, mut peer) = connect_fake(&fake).await;
        let server = async {
            peer.request().await.expect("request");
            peer.send_raw(b"\r\n").await; // blank lines are skipped
            peer.send_raw(bad).await;
            peer.expect_end().await;
        };
        let (reply, ()) = tokio::join!(qmp.execute("x", None, LONG), server);
        let shown = String::from_utf8_lossy(bad).trim().to_string();
        assert!(
            matches!(&reply, Err(QmpError::Protocol(m)) if m.contains(&shown) && m.contains("q.sock")),
            "{shown}: {reply:?}"
        );
    }
}

#[tokio::test]
async fn the_server_closing_while_a_call_waits_gives_closed() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let server = async {
        peer.request().await.expect("request");
        peer.send(event("SHUTDOWN", json!({"guest": false}))).await;
        drop(peer);
    };
    let (reply, waited, ()) = tokio::join!(
        qmp.execute("quit-ish", None, LONG),
        qmp.wait_event("NEVER", LONG),
        server
    );
    assert_eq!(reply, Err(QmpError::Closed));
    assert_eq!(waited, Err(QmpError::Closed));
    // Events that came before the end can still be taken.
    let shutdown = qmp.wait_event("SHUTDOWN", Duration::ZERO).await;
    assert_eq!(shutdown.expect("shutdown")["data"]["guest"], false);
    assert_eq!(
        qmp.execute("after", None, LONG).await,
        Err(QmpError::Closed)
    );
    assert_eq!(qmp.pending_len(), 0);
}

#[tokio::test]
async fn a_timed_out_call_removes_its_entry_and_its_late_reply_is_dropped() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let timed_out = qmp.execute("slow", None, Duration::from_millis(100)).await;
    assert!(
        matches!(&timed_out, Err(QmpError::Timeout(m)) if m.contains("slow") && m.contains("q.sock")),
        "{timed_out:?}"
    );
    assert_eq!(qmp.pending_len(), 0);
    // A caller dropped mid-wait removes its entry too.
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        qmp.execute("dropped", None, LONG),
    )
    .await;
    assert!(dropped.is_err());
    assert_eq!(qmp.pending_len(), 0);
    let server = async {
        let slow = peer.expect_request("slow").await;
        let dropped = peer.expect_request("dropped").await;
        let next = peer.expect_request("next").await;
        for late in [slow, dropped] {
            peer.send(json!({"id": late["id"], "return": "late"})).await;
        }
        peer.send(json!({"id": next["id"], "return": "next"})).await;
    };
    let (next, ()) = tokio::join!(qmp.execute("next", None, LONG), server);
    assert_eq!(next, Ok(json!("next")));
    assert_eq!(qmp.pending_len(), 0);
}

#[tokio::test]
async fn dropping_ends_the_tasks_and_closes_the_socket() {
    let fake = fake();
    let (qmp, mut peer) = connect_fake(&fake).await;
    let shared = Arc::downgrade(&qmp.shared);
    drop(qmp);
    peer.expect_end().await;
    for _ in 0..100 {
        if shared.upgrade().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the reader or writer task still holds the shared state");
}

#[tokio::test]
async fn greetings_that_are_not_qmp_are_refused() {
    for greeting in [
        "not json at all",
        r#"{"hello": 1}"#,
        r#"{"QMP": {"version": {"qemu": {"major": 7, "minor": 2}}}}"#,
        r#"{"QMP": {"version": {"qemu": {"major": "7", "minor": 2, "micro": 0}}}}"#,
        r#"{"return": {}}"#,
    ] {
        let fake = fake();
        let server = async {
            let mut peer = Peer::accept(&fake.listener).await;
            peer.send_raw(format!("{greeting}\n").as_bytes()).await;
            peer
        };
        let (connected, _peer) = tokio::join!(Qmp::connect(&fake.path, LONG), server);
        let error = connected.expect_err("refused");
        assert!(
            matches!(&error, QmpError::Protocol(m) if m.contains(greeting) && m.contains("q.sock")),
            "{greeting}: {error:?}"
        );
    }
}

#[tokio::test]
async fn a_long_greeting_is_quoted_shortly() {
    let fake = fake();
    let greeting = format!("{{\"junk\": \"{}\"}}\n", "é".repeat(10_000));
    let server = async {
        let mut peer = Peer::accept(&fake.listener).await;
        peer.send_raw(greeting.as_bytes()).await;
        peer
    };
    let (connected, _peer) = tokio::join!(Qmp::connect(&fake.path, LONG), server);
    let Err(QmpError::Protocol(message)) = connected else {
        panic!("{connected:?}");
    };
    assert!(message.len() < 1000, "{}", message.len());
    assert!(message.ends_with('…'));
}

#[tokio::test]
async fn a_silent_or_closing_server_at_connect() {
    let fake = fake();
    let server = async { Peer::accept(&fake.listener).await };
    let (silent, _peer) =
        tokio::join!(Qmp::connect(&fake.path, Duration::from_millis(200)), server);
    assert!(
        matches!(&silent, Err(QmpError::Timeout(m)) if m.contains("greeting")),
        "{silent:?}"
    );

    let server = async { drop(Peer::accept(&fake.listener).await) };
    let (closed, ()) = tokio::join!(Qmp::connect(&fake.path, LONG), server);
    assert_eq!(closed.err(), Some(QmpError::Closed));

    // Closed before answering qmp_capabilities.
    let server = async {
        let mut peer = Peer::accept(&fake.listener).await;
        peer.send_raw(format!("{GREETING}\n").as_bytes()).await;
        peer.expect_request("qmp_capabilities").await;
    };
    let (closed, ()) = tokio::join!(Qmp::connect(&fake.path, LONG), server);
    assert_eq!(closed.err(), Some(QmpError::Closed));
}

#[tokio::test]
async fn connect_waits_for_the_socket_until_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("late.sock");
    let missing = Qmp::connect(&path, Duration::from_millis(100)).await;
    assert!(
        matches!(&missing, Err(QmpError::Io(m)) if m.contains("late.sock")),
        "{missing:?}"
    );
    let server = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let listener = UnixListener::bind(&path).expect("bind");
        Peer::handshake(&listener).await
    };
    let (qmp, _peer) = tokio::join!(Qmp::connect(&path, LONG), server);
    assert_eq!(qmp.expect("connect").qemu_version(), "7.2.22");
}

// ---- Against a real QEMU ----

/// A QEMU with a QMP socket, killed when this is dropped.
struct Qemu {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Qemu {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }
}

/// Starts `qemu-system-x86_64` with `args` and connects to its QMP socket.
async fn qemu(args: &[&str]) -> (Qemu, Qmp) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("q.sock");
    let log = std::fs::File::create(dir.path().join("qemu.log")).expect("log");
    let child = tokio::process::Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(args)
        .arg("-chardev")
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            socket.display()
        ))
        .args(["-mon", "chardev=qmp,mode=control"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-system-x86_64 (install qemu-system-x86)");
    let qemu = Qemu { child, dir };
    match Qmp::connect(&socket, LONG).await {
        Ok(qmp) => (qemu, qmp),
        Err(e) => panic!("QMP connect: {e}\nQEMU said: {}", qemu.log()),
    }
}

const NONE: &[&str] = &["-machine", "none"];

#[tokio::test]
async fn qemu_greets_with_its_version_and_answers_query_status() {
    let (_qemu, qmp) = qemu(NONE).await;
    let output = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .expect("qemu --version");
    let banner = String::from_utf8_lossy(&output.stdout);
    assert!(
        banner.contains(&format!("version {}", qmp.qemu_version())),
        "{} vs {banner}",
        qmp.qemu_version()
    );
    let status = qmp
        .execute("query-status", None, LONG)
        .await
        .expect("status");
    assert_eq!(status["status"], "running", "{status}");
    let version = qmp
        .execute("query-version", None, LONG)
        .await
        .expect("version");
    let q = &version["qemu"];
    assert_eq!(
        format!("{}.{}.{}", q["major"], q["minor"], q["micro"]),
        qmp.qemu_version()
    );
}

#[tokio::test]
async fn qemu_refuses_unknown_commands_and_bad_arguments() {
    let (_qemu, qmp) = qemu(NONE).await;
    let unknown = qmp.execute("no-such-command", None, LONG).await;
    assert!(
        matches!(&unknown, Err(QmpError::Qemu { class, desc }) if class == "CommandNotFound" && desc.contains("no-such-command")),
        "{unknown:?}"
    );
    let bad = qmp
        .execute("query-status", Some(json!({"x": 1})), LONG)
        .await;
    assert!(
        matches!(&bad, Err(QmpError::Qemu { class, .. }) if class == "GenericError"),
        "{bad:?}"
    );
    // Arguments that are not an object are QEMU's to refuse, with our id kept.
    let not_object = qmp.execute("query-status", Some(json!([1])), LONG).await;
    assert!(
        matches!(&not_object, Err(QmpError::Qemu { desc, .. }) if desc.contains("must be an object")),
        "{not_object:?}"
    );
    assert_eq!(qmp.pending_len(), 0);
    assert!(qmp.execute("query-status", None, LONG).await.is_ok());
}

#[tokio::test]
async fn qemu_object_add_and_del() {
    let (_qemu, qmp) = qemu(NONE).await;
    let objects = async || {
        let list = qmp
            .execute("qom-list", Some(json!({"path": "/objects"})), LONG)
            .await
            .expect("qom-list");
        list.as_array()
            .expect("an array")
            .iter()
            .filter_map(|p| p["name"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    let add = json!({"qom-type": "memory-backend-ram", "id": "mem1", "size": 1 << 20});
    assert_eq!(
        qmp.execute("object-add", Some(add.clone()), LONG).await,
        Ok(json!({}))
    );
    assert!(objects().await.contains(&"mem1".to_string()));
    let twice = qmp.execute("object-add", Some(add), LONG).await;
    assert!(
        matches!(&twice, Err(QmpError::Qemu { class, .. }) if class == "GenericError"),
        "{twice:?}"
    );
    let del = json!({"id": "mem1"});
    assert_eq!(
        qmp.execute("object-del", Some(del.clone()), LONG).await,
        Ok(json!({}))
    );
    assert!(!objects().await.contains(&"mem1".to_string()));
    let gone = qmp.execute("object-del", Some(del), LONG).await;
    assert!(
        matches!(&gone, Err(QmpError::Qemu { desc, .. }) if desc.contains("not found")),
        "{gone:?}"
    );
}

#[tokio::test]
async fn qemu_stop_and_cont_give_stop_and_resume_events() {
    let (_qemu, qmp) = qemu(NONE).await;
    assert_eq!(qmp.execute("stop", None, LONG).await, Ok(json!({})));
    let stop = qmp.wait_event("STOP", LONG).await.expect("STOP");
    assert_eq!(stop["event"], "STOP");
    assert!(stop["timestamp"]["seconds"].is_u64(), "{stop}");
    assert!(stop["timestamp"]["microseconds"].is_u64(), "{stop}");
    let status = qmp
        .execute("query-status", None, LONG)
        .await
        .expect("status");
    assert_eq!(status["status"], "paused");
    assert_eq!(qmp.execute("cont", None, LONG).await, Ok(json!({})));
    let resume = qmp.wait_event("RESUME", LONG).await.expect("RESUME");
    assert_eq!(resume["event"], "RESUME");
    let status = qmp
        .execute("query-status", None, LONG)
        .await
        .expect("status");
    assert_eq!(status["status"], "running");
}

/// Takes DEVICE_DELETED events until the one for `device`; returns those seen.
async fn deleted(qmp: &Qmp, device: &str, deadline: Duration) -> Result<Vec<Value>, QmpError> {
    let until = Instant::now() + deadline;
    let mut seen = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let event = qmp.wait_event("DEVICE_DELETED", left).await?;
        let done = event["data"]["device"] == device;
        seen.push(event);
        if done {
            return Ok(seen);
        }
    }
}

async fn peripherals(qmp: &Qmp) -> Vec<String> {
    let list = qmp
        .execute(
            "qom-list",
            Some(json!({"path": "/machine/peripheral"})),
            LONG,
        )
        .await
        .expect("qom-list");
    list.as_array()
        .expect("an array")
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

async fn add_null_drive(qmp: &Qmp, node: &str) {
    let drive = json!({"driver": "null-co", "node-name": node, "size": 1 << 20});
    assert_eq!(
        qmp.execute("blockdev-add", Some(drive), LONG).await,
        Ok(json!({}))
    );
}

#[tokio::test]
async fn qemu_scsi_disk_hot_plug_cycle_gives_device_deleted() {
    let (_qemu, qmp) = qemu(&[
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-S",
        "-device",
        "virtio-scsi-pci,id=scsi0",
    ])
    .await;
    add_null_drive(&qmp, "disk1").await;
    let device = json!({"driver": "scsi-hd", "drive": "disk1", "id": "sd1", "bus": "scsi0.0"});
    assert_eq!(
        qmp.execute("device_add", Some(device), LONG).await,
        Ok(json!({}))
    );
    assert!(peripherals(&qmp).await.contains(&"sd1".to_string()));
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "sd1"})), LONG)
            .await,
        Ok(json!({}))
    );
    let events = deleted(&qmp, "sd1", LONG).await.expect("DEVICE_DELETED");
    let last = events.last().expect("one");
    assert_eq!(last["data"]["path"], "/machine/peripheral/sd1");
    assert!(!peripherals(&qmp).await.contains(&"sd1".to_string()));
    assert_eq!(
        qmp.execute("blockdev-del", Some(json!({"node-name": "disk1"})), LONG)
            .await,
        Ok(json!({}))
    );
}

/// On q35 with native PCIe hot-plug (ACPI hot-plug of bridges off), a device in a
/// root port whose slot no guest ever powered is unplugged at once.
#[tokio::test]
async fn qemu_virtio_blk_pci_hot_plug_cycle_on_native_pcie() {
    let (_qemu, qmp) = qemu(&[
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-S",
        "-global",
        "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
        "-device",
        "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
    ])
    .await;
    add_null_drive(&qmp, "disk1").await;
    let device = json!({"driver": "virtio-blk-pci", "drive": "disk1", "id": "vb1", "bus": "rp1"});
    assert_eq!(
        qmp.execute("device_add", Some(device), LONG).await,
        Ok(json!({}))
    );
    assert!(peripherals(&qmp).await.contains(&"vb1".to_string()));
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "vb1"})), LONG)
            .await,
        Ok(json!({}))
    );
    let events = deleted(&qmp, "vb1", LONG).await.expect("DEVICE_DELETED");
    // QEMU 7.2 first reports the virtio backend child, without a "device" member.
    assert!(
        events
            .iter()
            .any(|e| e["data"]["path"] == "/machine/peripheral/vb1/virtio-backend"),
        "{events:?}"
    );
    assert!(!peripherals(&qmp).await.contains(&"vb1".to_string()));
}

/// With q35's default ACPI hot-plug, unplugging waits for the guest's ACPI to eject
/// the device: without a guest OS, DEVICE_DELETED never comes.
#[tokio::test]
async fn qemu_acpi_hot_unplug_without_a_guest_never_completes() {
    let (_qemu, qmp) = qemu(&[
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-device",
        "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
    ])
    .await;
    add_null_drive(&qmp, "disk1").await;
    let device = json!({"driver": "virtio-blk-pci", "drive": "disk1", "id": "vb1", "bus": "rp1"});
    assert_eq!(
        qmp.execute("device_add", Some(device), LONG).await,
        Ok(json!({}))
    );
    assert_eq!(
        qmp.execute("device_del", Some(json!({"id": "vb1"})), LONG)
            .await,
        Ok(json!({}))
    );
    let waited = deleted(&qmp, "vb1", Duration::from_millis(1500)).await;
    assert!(
        matches!(&waited, Err(QmpError::Timeout(m)) if m.contains("DEVICE_DELETED")),
        "{waited:?}"
    );
    assert!(peripherals(&qmp).await.contains(&"vb1".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_two_executes_at_once_get_their_own_replies() {
    let (_qemu, qmp) = qemu(NONE).await;
    let (status, version) = tokio::join!(
        qmp.execute("query-status", None, LONG),
        qmp.execute("query-version", None, LONG)
    );
    assert!(status.expect("status").get("status").is_some());
    assert!(version.expect("version").get("qemu").is_some());

    let qmp = Arc::new(qmp);
    let tasks: Vec<_> = (0..32)
        .map(|n| {
            let qmp = Arc::clone(&qmp);
            tokio::spawn(async move {
                if n % 2 == 0 {
                    let r = qmp.execute("query-status", None, LONG).await;
                    assert!(r.expect("status").get("status").is_some());
                } else {
                    let r = qmp.execute("query-version", None, LONG).await;
                    assert!(r.expect("version").get("qemu").is_some());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    assert_eq!(qmp.pending_len(), 0);
}

#[tokio::test]
async fn qemu_quit_gives_shutdown_then_closed() {
    let (mut qemu, qmp) = qemu(NONE).await;
    assert_eq!(qmp.execute("quit", None, LONG).await, Ok(json!({})));
    let status = tokio::time::timeout(LONG, qemu.child.wait())
        .await
        .expect("QEMU exits")
        .expect("wait");
    assert!(status.success(), "{status}");
    let shutdown = qmp.wait_event("SHUTDOWN", LONG).await.expect("SHUTDOWN");
    assert_eq!(shutdown["data"]["reason"], "host-qmp-quit", "{shutdown}");
    assert_eq!(
        qmp.execute("query-status", None, LONG).await,
        Err(QmpError::Closed)
    );
    assert_eq!(qmp.wait_event("STOP", LONG).await, Err(QmpError::Closed));
}

#[tokio::test]
async fn qemu_killed_while_a_call_waits_gives_closed() {
    let (mut qemu, qmp) = qemu(NONE).await;
    let (waited, ()) = tokio::join!(qmp.wait_event("NEVER", LONG), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        qemu.child.start_kill().expect("kill");
    });
    assert_eq!(waited, Err(QmpError::Closed));
}

/// QMP round trip of `query-status`; run with `--ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement; prints the numbers"]
async fn qemu_round_trip() {
    let (_qemu, qmp) = qemu(NONE).await;
    for _ in 0..50 {
        qmp.execute("query-status", None, LONG)
            .await
            .expect("warm up");
    }
    let mut micros = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let start = std::time::Instant::now();
        qmp.execute("query-status", None, LONG)
            .await
            .expect("status");
        micros.push(start.elapsed().as_micros());
    }
    micros.sort_unstable();
    println!(
        "QMP query-status round trip over {} calls: median {} µs, p99 {} µs, min {} µs, max {} µs",
        micros.len(),
        micros[micros.len() / 2],
        micros[micros.len() * 99 / 100],
        micros[0],
        micros[micros.len() - 1]
    );
}
