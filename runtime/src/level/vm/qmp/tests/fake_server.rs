//! Against a fake QMP server on a unix socket.

use super::*;

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
