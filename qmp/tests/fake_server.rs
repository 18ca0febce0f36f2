//! The QMP client against a scripted QMP peer (`weft_qmp::fake::script`): out-of-order
//! replies, malformed lines, error replies, interleaved events, closing mid-command,
//! missing greetings, oversized lines, and the job waits.

use std::time::Duration;

use serde_json::json;
use weft_qmp::fake::script::{serve, serve_qmp};
use weft_qmp::fake::GREETING;
use weft_qmp::{BlockJobOutcome, Error, Qmp, MAX_MESSAGE_LEN};

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn greeting_version_and_negotiation() {
    let server = serve_qmp(|mut c| async move { c.until_eof().await });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    assert_eq!(qmp.version(), (7, 2, 0));
    assert_eq!(qmp.greeting().package, "Debian 1:7.2+dfsg-7+deb12u6");
    assert!(!qmp.is_closed());
    assert_eq!(qmp.close_reason(), None);
    drop(qmp);
    // Dropping the last clone closes the socket, so the server sees end of stream.
    server.finish().await;
}

#[tokio::test]
async fn out_of_order_replies_match_by_id() {
    let server = serve_qmp(|mut c| async move {
        let mut cmds = Vec::new();
        for _ in 0..3 {
            cmds.push(c.recv().await);
        }
        // Reply last-first; each reply names the command it answers.
        for cmd in cmds.iter().rev() {
            c.reply(
                &cmd["id"],
                json!({"answer": cmd["execute"], "args": cmd["arguments"]}),
            )
            .await;
        }
        c.until_eof().await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    let (a, b, d) = tokio::join!(
        qmp.execute_raw("cmd-a", Some(json!({"n": 1}))),
        qmp.execute_raw("cmd-b", None),
        qmp.execute_raw("cmd-c", Some(json!({"n": 3}))),
    );
    assert_eq!(a.expect("a"), json!({"answer": "cmd-a", "args": {"n": 1}}));
    assert_eq!(b.expect("b"), json!({"answer": "cmd-b", "args": null}));
    assert_eq!(d.expect("c"), json!({"answer": "cmd-c", "args": {"n": 3}}));
    drop(qmp);
    server.finish().await;
}

#[tokio::test]
async fn many_concurrent_tasks_on_one_connection() {
    const N: usize = 64;
    let server = serve_qmp(|mut c| async move {
        // Collect in batches of 8 and answer each batch in reverse.
        let mut batch = Vec::new();
        for _ in 0..N {
            batch.push(c.recv().await);
            if batch.len() == 8 {
                for cmd in batch.drain(..).rev() {
                    c.reply(&cmd["id"], cmd["arguments"].clone()).await;
                }
            }
        }
        c.until_eof().await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let qmp = qmp.clone();
            tokio::spawn(async move { (i, qmp.execute_raw("echo", Some(json!({ "i": i }))).await) })
        })
        .collect();
    for t in tasks {
        let (i, r) = t.await.expect("task");
        assert_eq!(r.expect("reply"), json!({ "i": i }));
    }
    drop(qmp);
    server.finish().await;
}

#[tokio::test]
async fn typed_command_round_trip() {
    let server = serve_qmp(|mut c| async move {
        let cmd = c.recv().await;
        assert_eq!(cmd["execute"], "query-status");
        // No empty `arguments` on the wire for a command without any.
        assert!(cmd.get("arguments").is_none(), "{cmd}");
        c.reply(
            &cmd["id"],
            json!({"status": "paused", "singlestep": false, "running": false}),
        )
        .await;
        let cmd = c.recv().await;
        assert_eq!(cmd["execute"], "stop");
        c.reply(&cmd["id"], json!({})).await;
        let cmd = c.recv().await;
        assert_eq!(cmd["execute"], "human-monitor-command");
        assert_eq!(cmd["arguments"]["command-line"], "info version");
        c.reply(&cmd["id"], json!("7.2.22\r\n")).await;
        let cmd = c.recv().await;
        assert_eq!(cmd["execute"], "query-status");
        // Wrong shape for StatusInfo.
        c.reply(&cmd["id"], json!([1, 2])).await;
        c.until_eof().await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    let status = qmp
        .execute(weft_qmp::qapi::qmp::query_status {})
        .await
        .expect("query-status");
    assert!(!status.running);
    assert_eq!(status.status, weft_qmp::qapi::qmp::RunState::paused);
    qmp.execute(weft_qmp::qapi::qmp::stop {})
        .await
        .expect("stop");
    let version = qmp
        .execute(weft_qmp::qapi::qmp::human_monitor_command {
            command_line: "info version".into(),
            cpu_index: None,
        })
        .await
        .expect("hmp");
    assert_eq!(version, "7.2.22\r\n");
    match qmp.execute(weft_qmp::qapi::qmp::query_status {}).await {
        Err(Error::Protocol(msg)) => assert!(msg.contains("query-status"), "{msg}"),
        other => panic!("want a protocol error, got {other:?}"),
    }
    drop(qmp);
    server.finish().await;
}

#[tokio::test]
async fn malformed_lines_are_dropped_and_the_connection_survives() {
    let server = serve_qmp(|mut c| async move {
        let (id, _) = c.expect("ping").await;
        for junk in [
            "this is not json",
            "[1, 2, 3]",
            "{\"return\": ",
            "{\"error\": {\"class\": 5}}",
            "\u{0}\u{1}",
            "{\"neither\": true}",
            "",
        ] {
            c.send(junk).await;
        }
        // Replies that match nothing: unknown id, no id, id of another type.
        c.send_json(json!({"return": {}, "id": 987654})).await;
        c.send_json(json!({"return": {}})).await;
        c.send_json(json!({"return": {}, "id": "one"})).await;
        c.reply(&id, json!({"pong": true})).await;
        c.until_eof().await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    let r = qmp.execute_raw("ping", None).await.expect("ping");
    assert_eq!(r, json!({"pong": true}));
    assert!(!qmp.is_closed());
    drop(qmp);
    server.finish().await;
}

#[tokio::test]
async fn error_reply_keeps_class_and_desc() {
    let server = serve_qmp(|mut c| async move {
        let (id, args) = c.expect("device_del").await;
        assert_eq!(args, json!({"id": "nope"}));
        c.error(&id, "DeviceNotFound", "Device 'nope' not found")
            .await;
        c.until_eof().await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    let err = qmp
        .execute(weft_qmp::qapi::qmp::device_del { id: "nope".into() })
        .await
        .expect_err("fails");
    match &err {
        Error::Qmp { class, desc } => {
            assert_eq!(class, "DeviceNotFound");
            assert_eq!(desc, "Device 'nope' not found");
        }
        other => panic!("want Error::Qmp, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "qemu error (DeviceNotFound): Device 'nope' not found"
    );
    drop(qmp);
    server.finish().await;
}

#[tokio::test]
async fn events_interleaved_with_replies() {
    let server = serve_qmp(|mut c| async move {
        let (id, _) = c.expect("stop").await;
        c.event("STOP", json!({})).await;
        c.event("FROM_A_NEWER_QEMU", json!({"x": [1, 2]})).await;
        c.reply(&id, json!({})).await;
        c.send(r#"{"event": "RESUME", "timestamp": {"seconds": 7, "microseconds": 8}}"#)
            .await;
        c.until_eof().await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    let mut events = qmp.events();
    qmp.execute(weft_qmp::qapi::qmp::stop {})
        .await
        .expect("stop");
    let e = events.recv().await.expect("event");
    assert_eq!(e.name, "STOP");
    assert_eq!(e.timestamp, (1700000000, 42));
    assert!(e.typed::<weft_qmp::qapi::qmp::STOP>().is_some());
    let e = events.recv().await.expect("event");
    assert_eq!(e.name, "FROM_A_NEWER_QEMU");
    assert_eq!(e.data, json!({"x": [1, 2]}));
    let e = events.recv().await.expect("event");
    assert_eq!(e.name, "RESUME");
    assert_eq!(e.data, json!({}));
    assert_eq!(e.timestamp, (7, 8));
    drop(qmp);
    server.finish().await;
}

#[tokio::test]
async fn wait_event_subscribes_when_called() {
    let server = serve_qmp(|mut c| async move {
        let (id, _) = c.expect("stop").await;
        // The event comes before the reply: a waiter created after the reply would miss it.
        c.event("STOP", json!({})).await;
        c.reply(&id, json!({})).await;
        c.until_eof().await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    let stopped = qmp.wait_event(T, |e| e.name == "STOP");
    qmp.execute(weft_qmp::qapi::qmp::stop {})
        .await
        .expect("stop");
    let e = stopped.await.expect("STOP seen");
    assert_eq!(e.name, "STOP");
    // Nothing else comes: a second wait times out.
    let err = qmp
        .wait_event(Duration::from_millis(100), |e| e.name == "STOP")
        .await
        .expect_err("times out");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    drop(qmp);
    server.finish().await;
}

#[tokio::test]
async fn close_mid_command_fails_pending_and_new_commands() {
    let server = serve_qmp(|mut c| async move {
        let _ = c.expect("query-status").await;
        c.event(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        )
        .await;
        // Close without replying.
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    let shutdown = qmp.wait_event(T, |e| e.name == "SHUTDOWN");
    let err = qmp
        .execute_raw("query-status", None)
        .await
        .expect_err("no reply");
    assert!(matches!(err, Error::Closed), "{err:?}");
    tokio::time::timeout(T, qmp.closed())
        .await
        .expect("closed resolves");
    assert!(qmp.is_closed());
    assert_eq!(
        qmp.close_reason().as_deref(),
        Some("peer closed the connection")
    );
    // An event that came before the close is still delivered to a waiter.
    assert_eq!(shutdown.await.expect("SHUTDOWN").name, "SHUTDOWN");
    // After the close, waiting and commands fail at once.
    assert!(matches!(
        qmp.wait_event(T, |_| true).await,
        Err(Error::Closed)
    ));
    assert!(matches!(
        qmp.execute(weft_qmp::qapi::qmp::query_status {}).await,
        Err(Error::Closed)
    ));
    assert!(matches!(qmp.wait_job("j", T).await, Err(Error::Closed)));
    server.finish().await;
}

#[tokio::test]
async fn no_greeting_times_out() {
    let server = serve(|mut c| async move { c.until_eof().await });
    let start = std::time::Instant::now();
    let err = Qmp::connect_timeout(&server.path, Duration::from_millis(200))
        .await
        .expect_err("no greeting");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("qmp greeting"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));
    server.finish().await;
}

#[tokio::test]
async fn non_qmp_peers_are_rejected() {
    for (garbage, needle) in [
        ("HTTP/1.1 400 Bad Request\r", "HTTP/1.1"),
        (r#"{"event": "STOP"}"#, "not a greeting"),
        (r#"{"QMP": {"capabilities": []}}"#, "version"),
    ] {
        let server = serve(move |mut c| async move {
            c.send(garbage).await;
            c.until_eof().await;
        });
        match Qmp::connect_timeout(&server.path, T).await {
            Err(Error::NotQmp { detail }) => assert!(detail.contains(needle), "{detail}"),
            other => panic!("{garbage}: want NotQmp, got {other:?}"),
        }
        server.finish().await;
    }
    // A peer that hangs up at once.
    let server = serve(|c| async move { drop(c) });
    assert!(matches!(
        Qmp::connect_timeout(&server.path, T).await,
        Err(Error::NotQmp { .. })
    ));
    server.finish().await;
    // Nobody listening at all.
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        Qmp::connect_timeout(&dir.path().join("none.sock"), T).await,
        Err(Error::Io(_))
    ));
}

#[tokio::test]
async fn capabilities_refused_fails_connect() {
    let server = serve(|mut c| async move {
        c.send(GREETING).await;
        let (id, _) = c.expect("qmp_capabilities").await;
        c.error(&id, "CommandNotFound", "no").await;
        c.until_eof().await;
    });
    match Qmp::connect(&server.path).await {
        Err(Error::Qmp { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("want Error::Qmp, got {other:?}"),
    }
    server.finish().await;
}

#[tokio::test]
async fn oversized_line_closes_the_connection() {
    let server = serve_qmp(|mut c| async move {
        // A big message under the limit is fine.
        let (id, _) = c.expect("big").await;
        c.reply(&id, json!("x".repeat(2 * 1024 * 1024))).await;
        // One over it is not.
        let (id, _) = c.expect("huge").await;
        let huge = format!(
            r#"{{"return": "{}", "id": {id}}}"#,
            "y".repeat(MAX_MESSAGE_LEN)
        );
        // The client may hang up while this is being written.
        let _ = c.send_raw(huge.as_bytes()).await;
        let _ = c.send_raw(b"\n").await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    let big = qmp.execute_raw("big", None).await.expect("big reply");
    assert_eq!(big.as_str().map(str::len), Some(2 * 1024 * 1024));
    let err = qmp.execute_raw("huge", None).await.expect_err("oversized");
    assert!(matches!(err, Error::Closed), "{err:?}");
    let reason = qmp.close_reason().expect("closed");
    assert!(reason.contains("exceeds the limit"), "{reason}");
    server.finish().await;
}

#[tokio::test]
async fn abandoned_command_reply_is_dropped() {
    let server = serve_qmp(|mut c| async move {
        let (slow, _) = c.expect("slow").await;
        let (fast, _) = c.expect("fast").await;
        // Answer the abandoned command late, then the live one.
        c.reply(&slow, json!("late")).await;
        c.reply(&fast, json!("fast")).await;
        c.until_eof().await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    let slow =
        tokio::time::timeout(Duration::from_millis(100), qmp.execute_raw("slow", None)).await;
    assert!(slow.is_err(), "slow command should have been abandoned");
    assert_eq!(
        qmp.execute_raw("fast", None).await.expect("fast"),
        json!("fast")
    );
    drop(qmp);
    server.finish().await;
}

#[tokio::test]
async fn wait_job_reports_the_job_error_and_dismisses() {
    let server = serve_qmp(|mut c| async move {
        let (id, _) = c.expect("query-jobs").await;
        c.reply(
            &id,
            json!([{"id": "other", "status": "running", "type": "create"},
                             {"id": "j1", "status": "running", "type": "create"}]),
        )
        .await;
        c.event(
            "JOB_STATUS_CHANGE",
            json!({"id": "other", "status": "concluded"}),
        )
        .await;
        c.event(
            "JOB_STATUS_CHANGE",
            json!({"id": "j1", "status": "waiting"}),
        )
        .await;
        c.event(
            "JOB_STATUS_CHANGE",
            json!({"id": "j1", "status": "concluded"}),
        )
        .await;
        let (id, _) = c.expect("query-jobs").await;
        c.reply(
            &id,
            json!([{"id": "j1", "status": "concluded", "type": "create",
                             "error": "Could not create image: No space left on device"}]),
        )
        .await;
        let (id, args) = c.expect("job-dismiss").await;
        assert_eq!(args, json!({"id": "j1"}));
        c.reply(&id, json!({})).await;
        c.until_eof().await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    match qmp.wait_job("j1", T).await {
        Err(Error::Job { id, desc }) => {
            assert_eq!(id, "j1");
            assert_eq!(desc, "Could not create image: No space left on device");
        }
        other => panic!("want Error::Job, got {other:?}"),
    }
    drop(qmp);
    server.finish().await;
}

#[tokio::test]
async fn wait_job_sees_a_job_that_ended_before_it_was_polled() {
    let server = serve_qmp(|mut c| async move {
        let (id, _) = c.expect("blockdev-create").await;
        // The job runs and is auto-dismissed before the client looks.
        for status in [
            "created",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null",
        ] {
            c.event("JOB_STATUS_CHANGE", json!({"id": "fast", "status": status}))
                .await;
        }
        c.reply(&id, json!({})).await;
        let (id, _) = c.expect("query-jobs").await;
        c.reply(&id, json!([])).await;
        // A job that never existed.
        let (id, _) = c.expect("query-jobs").await;
        c.reply(&id, json!([])).await;
        c.until_eof().await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    let done = qmp.wait_job("fast", T);
    qmp.execute_raw("blockdev-create", Some(json!({"job-id": "fast"})))
        .await
        .expect("create");
    done.await.expect("job ended");
    match qmp.wait_job("ghost", T).await {
        Err(Error::NoSuchJob(id)) => assert_eq!(id, "ghost"),
        other => panic!("want NoSuchJob, got {other:?}"),
    }
    drop(qmp);
    server.finish().await;
}

#[tokio::test]
async fn wait_job_times_out() {
    let server = serve_qmp(|mut c| async move {
        let (id, _) = c.expect("query-jobs").await;
        c.reply(&id, json!([{"id": "slow", "status": "running"}]))
            .await;
        c.until_eof().await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    let err = qmp
        .wait_job("slow", Duration::from_millis(200))
        .await
        .expect_err("times out");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("job slow"), "{err}");
    drop(qmp);
    server.finish().await;
}

#[tokio::test]
async fn wait_block_job_outcomes() {
    let server = serve_qmp(|mut c| async move {
        // 1: completes.
        let (id, _) = c.expect("query-block-jobs").await;
        c.reply(&id, json!([{"device": "b1", "type": "backup"}]))
            .await;
        c.event(
            "BLOCK_JOB_COMPLETED",
            json!({"device": "other", "type": "backup", "len": 1, "offset": 1, "speed": 0}),
        )
        .await;
        c.event(
            "BLOCK_JOB_COMPLETED",
            json!({"device": "b1", "type": "backup", "len": 4096, "offset": 4096, "speed": 0}),
        )
        .await;
        // 2: an error with action report, then completion with the error.
        let (id, _) = c.expect("query-block-jobs").await;
        c.reply(&id, json!([{"device": "b2", "type": "backup"}]))
            .await;
        c.event(
            "BLOCK_JOB_ERROR",
            json!({"device": "b2", "operation": "write", "action": "report"}),
        )
        .await;
        c.event("BLOCK_JOB_COMPLETED", json!({"device": "b2", "type": "backup", "len": 4096, "offset": 0, "speed": 0, "error": "Input/output error"})).await;
        // 3: stops on an error.
        let (id, _) = c.expect("query-block-jobs").await;
        c.reply(&id, json!([{"device": "b3", "type": "mirror"}]))
            .await;
        c.event(
            "BLOCK_JOB_ERROR",
            json!({"device": "b3", "operation": "read", "action": "stop"}),
        )
        .await;
        // 4: cancelled before the waiter polled; 5: unknown.
        let (id, _) = c.expect("block-job-cancel").await;
        c.event(
            "BLOCK_JOB_CANCELLED",
            json!({"device": "b4", "type": "backup", "len": 10, "offset": 5, "speed": 0}),
        )
        .await;
        c.reply(&id, json!({})).await;
        for _ in 0..2 {
            let (id, _) = c.expect("query-block-jobs").await;
            c.reply(&id, json!([])).await;
        }
        c.until_eof().await;
    });
    let qmp = Qmp::connect(&server.path).await.expect("connect");
    assert_eq!(
        qmp.wait_block_job("b1", T).await.expect("b1"),
        BlockJobOutcome::Completed {
            job_type: "backup".into(),
            offset: 4096,
            len: 4096
        }
    );
    assert_eq!(
        qmp.wait_block_job("b2", T).await.expect("b2"),
        BlockJobOutcome::Failed {
            job_type: "backup".into(),
            error: "Input/output error".into()
        }
    );
    assert_eq!(
        qmp.wait_block_job("b3", T).await.expect("b3"),
        BlockJobOutcome::Stopped {
            operation: "read".into()
        }
    );
    let b4 = qmp.wait_block_job("b4", T);
    qmp.execute_raw("block-job-cancel", Some(json!({"device": "b4"})))
        .await
        .expect("cancel");
    assert_eq!(
        b4.await.expect("b4"),
        BlockJobOutcome::Cancelled {
            job_type: "backup".into(),
            offset: 5,
            len: 10
        }
    );
    assert!(matches!(qmp.wait_block_job("b5", T).await, Err(Error::NoSuchJob(d)) if d == "b5"));
    drop(qmp);
    server.finish().await;
}
