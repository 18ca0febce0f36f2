//! The DPA link at the socket level: weftd's real unix listener (the socket that
//! `vhost-device-vsock` connects to for each guest connection) and a real
//! provenance log in a temporary directory, with guests played by this test:
//! well-behaved ones, and hostile ones sending oversize frames, garbage, bad
//! checksums, gaps, invalid entries and floods. weftd's handler must stay up, a
//! well-behaved VM next to a hostile one must be untouched, and resends after a
//! dropped connection must be deduplicated.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use weft::dpa::{proto, ApplyError, DpaLink, LinkLimits};
use weft_dpa::proto::{
    caps, encode, Applied, DataType, Decoder, Entry, Hello, Message, Operation, Welcome,
};
use weft_provenance::log::{LogOptions, ProvenanceLog, Query};

const WAIT: Duration = Duration::from_secs(10);

fn entry(seq: u64) -> Entry {
    Entry {
        seq,
        guest_time_us: 1_700_000_000_000_000 + seq as i64,
        data_type: DataType::Sqlite,
        op: Operation::Update,
        source: "/data/app.db".into(),
        collection: "customers".into(),
        key: format!("[{seq}]"),
        old: Some(r#"{"customer_name":"Alice"}"#.into()),
        new: Some(r#"{"customer_name":"Bob"}"#.into()),
        tx: Some(seq / 10),
    }
}

fn batch(from: u64, to: u64) -> Message {
    Message::Batch((from..=to).map(entry).collect())
}

fn hello(caps: &[&str]) -> Message {
    Message::Hello(Hello {
        version: proto::PROTOCOL_VERSION,
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        agent: "dpa-link-test".into(),
    })
}

/// The host side under test: a link over a real log, listening for some VMs.
struct Host {
    _dir: tempfile::TempDir,
    log: ProvenanceLog,
    link: DpaLink,
    sockets: PathBuf,
    listeners: Vec<tokio::task::AbortHandle>,
}

impl Host {
    fn new(limits: LinkLimits, options: LogOptions, vms: &[&str]) -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ProvenanceLog::open(dir.path().join("provenance"), options).expect("log");
        let link = DpaLink::new(Arc::new(log.clone()), limits);
        let sockets = dir.path().join("vsock");
        std::fs::create_dir_all(&sockets).expect("mkdir");
        let mut host = Host {
            _dir: dir,
            log,
            link,
            sockets,
            listeners: Vec::new(),
        };
        for vm in vms {
            let l = host.link.listen_unix(vm, &host.socket(vm)).expect("listen");
            host.listeners.push(l);
        }
        host
    }

    fn socket(&self, vm: &str) -> PathBuf {
        self.sockets.join(format!("{vm}.vsock_5150"))
    }

    async fn guest(&self, vm: &str) -> Guest {
        Guest::connect(&self.socket(vm)).await
    }

    fn seqs(&self, vm: &str) -> Vec<u64> {
        self.log
            .query(vm, &Query::default())
            .expect("query")
            .into_iter()
            .map(|r| {
                assert_eq!(r.vm, vm, "a record of {vm} names another VM");
                r.entry.seq
            })
            .collect()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for l in &self.listeners {
            l.abort();
        }
    }
}

fn limits() -> LinkLimits {
    LinkLimits {
        entries_per_sec: 0,
        bytes_per_sec: 0,
        hello_timeout: Duration::from_secs(2),
        quota_pause: Duration::from_millis(300),
        apply_timeout: Duration::from_secs(2),
    }
}

/// A guest's end of a connection (what vhost-device-vsock hands over).
struct Guest {
    stream: UnixStream,
    dec: Decoder,
}

impl Guest {
    async fn connect(path: &Path) -> Guest {
        Guest {
            stream: UnixStream::connect(path).await.expect("connect"),
            dec: Decoder::new(),
        }
    }

    async fn send(&mut self, msg: &Message) {
        self.send_raw(&encode(msg)).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        // The host may already have closed on an earlier violation.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next frame from the host; `None` once it closed the connection.
    async fn recv(&mut self) -> Option<Message> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self.dec.next_message().expect("host frames decode") {
                return Some(m);
            }
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut buf))
                .await
                .expect("the host answers or closes in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.dec.feed(&buf[..n]);
        }
    }

    async fn handshake(&mut self, caps: &[&str]) -> Welcome {
        self.send(&hello(caps)).await;
        match self.recv().await {
            Some(Message::Welcome(w)) => w,
            other => panic!("want welcome, got {other:?}"),
        }
    }

    async fn expect_ack(&mut self) -> u64 {
        match self.recv().await {
            Some(Message::Ack { upto }) => upto,
            other => panic!("want ack, got {other:?}"),
        }
    }

    /// The host ends the connection: a goodbye (whose reason is returned), then EOF.
    async fn expect_refused(&mut self) -> String {
        let mut reason = String::new();
        loop {
            match self.recv().await {
                None => return reason,
                Some(Message::Goodbye { reason: r }) => reason = r,
                Some(Message::Ack { .. } | Message::Welcome(_)) => {}
                Some(other) => panic!("want goodbye and close, got {other:?}"),
            }
        }
    }
}

/// A well-behaved VM streams `from..=to` in batches of `per` and checks each ack.
async fn stream_ok(host: &Host, vm: &str, from: u64, to: u64, per: u64) {
    let mut g = host.guest(vm).await;
    let w = g.handshake(&[caps::SQLITE]).await;
    assert_eq!(w.acked, from - 1, "{vm} resumes where its log ends");
    let mut next = from;
    while next <= to {
        let last = (next + per - 1).min(to);
        g.send(&batch(next, last)).await;
        assert_eq!(g.expect_ack().await, last);
        next = last + 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_logged_and_a_resend_after_a_drop_is_deduplicated() {
    let host = Host::new(limits(), LogOptions::default(), &["vm1"]);
    stream_ok(&host, "vm1", 1, 250, 100).await;
    assert_eq!(host.seqs("vm1"), (1..=250).collect::<Vec<_>>());

    // A batch sent, then the connection drops before the guest reads the ack.
    let mut g = host.guest("vm1").await;
    g.handshake(&[]).await;
    g.send(&batch(251, 300)).await;
    drop(g);
    // The guest reconnects: the host's acked says where to resume; the guest
    // resends from its spool a little before that, as after a lost ack.
    let mut g = host.guest("vm1").await;
    let w = g.handshake(&[]).await;
    assert!(w.acked == 250 || w.acked == 300, "acked {}", w.acked);
    g.send(&batch(241, 320)).await;
    assert_eq!(g.expect_ack().await, 320);
    // And a plain duplicate of what is held changes nothing.
    g.send(&batch(1, 10)).await;
    assert_eq!(g.expect_ack().await, 320);
    drop(g);
    assert_eq!(host.seqs("vm1"), (1..=320).collect::<Vec<_>>());
    let stats = host.link.stats("vm1").expect("stats");
    assert_eq!(stats.acked, 320);
    assert_eq!(stats.refused, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_that_connection_only() {
    let host = Host::new(limits(), LogOptions::default(), &["good", "evil"]);
    stream_ok(&host, "good", 1, 100, 50).await;
    stream_ok(&host, "evil", 1, 10, 10).await;

    // An oversize length: refused before any payload is read.
    let mut g = host.guest("evil").await;
    g.handshake(&[]).await;
    let mut frame = ((proto::MAX_PAYLOAD as u32) + 1).to_le_bytes().to_vec();
    frame.push(3);
    g.send_raw(&frame).await;
    let reason = g.expect_refused().await;
    assert!(reason.contains("over the limit"), "{reason}");

    // Garbage instead of a hello.
    let mut g = host.guest("evil").await;
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    g.send_raw(&garbage).await;
    g.expect_refused().await;

    // A frame whose checksum does not match.
    let mut g = host.guest("evil").await;
    g.handshake(&[]).await;
    let mut bad = encode(&batch(11, 20));
    let n = bad.len();
    bad[n - 1] ^= 0xff;
    g.send_raw(&bad).await;
    assert!(g.expect_refused().await.contains("checksum"));

    // A frame of an unknown kind, and one whose payload is not its message.
    for (kind, payload) in [(42u8, vec![1u8, 2, 3]), (3u8, vec![0xff; 16])] {
        let mut g = host.guest("evil").await;
        g.handshake(&[]).await;
        let mut f = (payload.len() as u32).to_le_bytes().to_vec();
        f.push(kind);
        f.extend_from_slice(&payload);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), &payload);
        f.extend_from_slice(&crc.to_le_bytes());
        g.send_raw(&f).await;
        g.expect_refused().await;
    }

    // A batch that would leave a gap in the log.
    let mut g = host.guest("evil").await;
    assert_eq!(g.handshake(&[]).await.acked, 10);
    g.send(&batch(20, 30)).await;
    assert!(g.expect_refused().await.contains("gap"));

    // Invalid entries: seq 0, a relative source, a value that is not JSON, a
    // batch whose own seqs skip.
    let mut bad_entries = Vec::new();
    bad_entries.push(vec![entry(0)]);
    let mut e = entry(11);
    e.source = "data/app.db".into();
    bad_entries.push(vec![e]);
    let mut e = entry(11);
    e.new = Some("{not json".into());
    bad_entries.push(vec![e]);
    bad_entries.push(vec![entry(11), entry(13)]);
    // A seq at the top of the range followed by anything must not overflow.
    bad_entries.push(vec![entry(u64::MAX), entry(1)]);
    for entries in bad_entries {
        let mut g = host.guest("evil").await;
        g.handshake(&[]).await;
        g.send(&Message::Batch(entries)).await;
        let reason = g.expect_refused().await;
        assert!(reason.contains("invalid"), "{reason:?}");
    }

    // Frames only the host sends, from a guest.
    let mut g = host.guest("evil").await;
    g.handshake(&[]).await;
    g.send(&Message::Ack { upto: 99 }).await;
    assert!(g.expect_refused().await.contains("ack"));

    // Something other than hello first, and no hello at all.
    let mut g = host.guest("evil").await;
    g.send(&batch(11, 12)).await;
    g.expect_refused().await;
    let mut g = host.guest("evil").await;
    let started = Instant::now();
    assert!(g.expect_refused().await.contains("hello"));
    assert!(started.elapsed() >= Duration::from_secs(2));

    // A frame cut off by the guest closing: nothing is appended.
    let mut g = host.guest("evil").await;
    g.handshake(&[]).await;
    let f = encode(&batch(11, 20));
    g.send_raw(&f[..f.len() / 2]).await;
    drop(g);

    // weftd is still there for both: evil's log holds only its valid entries, and
    // a well-behaved session of evil goes on where it left off.
    stream_ok(&host, "evil", 11, 20, 10).await;
    assert_eq!(host.seqs("evil"), (1..=20).collect::<Vec<_>>());
    stream_ok(&host, "good", 101, 200, 50).await;
    assert_eq!(host.seqs("good"), (1..=200).collect::<Vec<_>>());
    // Fourteen refusals; the cut-off frame may not count (the next connection can
    // replace that one before its end is read).
    let evil = host.link.stats("evil").expect("stats");
    assert!(evil.refused >= 14, "{evil:?}");
    assert_eq!(host.link.stats("good").expect("stats").refused, 0);
}

// On tokio's paused clock: time moves only while every task waits for a timer (the rate
// limiter's pauses), so the durations below are what the limiter imposed, not how busy
// the machine was.
#[tokio::test(start_paused = true)]
async fn a_flood_slows_that_vm_only() {
    let rate = 2_000;
    let host = Host::new(
        LinkLimits {
            entries_per_sec: rate,
            ..limits()
        },
        LogOptions::default(),
        &["good", "flood"],
    );
    // The flood: 8000 entries at once, four seconds' worth at the rate (after the
    // first second's burst, three).
    let flood = tokio::spawn({
        let mut g = host.guest("flood").await;
        async move {
            g.handshake(&[]).await;
            let started = tokio::time::Instant::now();
            for from in (1..=8000).step_by(1000) {
                g.send(&batch(from, from + 999)).await;
            }
            let mut upto = 0;
            while upto < 8000 {
                upto = g.expect_ack().await;
            }
            started.elapsed()
        }
    });
    // Once the flood is being held back, a well-behaved VM gets each ack at once.
    wait_until::Wait::new("the flood to be throttled", WAIT)
        .until_async(|| async {
            match host.link.stats("flood") {
                Some(s) if s.throttled_ms > 0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await
        .expect("throttled");
    let mut g = host.guest("good").await;
    g.handshake(&[]).await;
    let mut worst = Duration::ZERO;
    for from in (1..=500).step_by(50) {
        let t = tokio::time::Instant::now();
        g.send(&batch(from, from + 49)).await;
        assert_eq!(g.expect_ack().await, from + 49);
        worst = worst.max(t.elapsed());
    }
    let flood_took = flood.await.expect("flood task");
    eprintln!(
        "flood of 8000 entries at {rate}/s took {flood_took:?}; good VM's slowest ack {worst:?}"
    );
    assert!(
        flood_took >= Duration::from_millis(2800),
        "the flood was not slowed: {flood_took:?}"
    );
    assert!(
        worst < Duration::from_millis(1000),
        "good VM slowed: {worst:?}"
    );
    assert!(host.link.stats("flood").expect("stats").throttled_ms >= 2000);
    assert_eq!(host.seqs("flood").len(), 8000);
    assert_eq!(host.seqs("good"), (1..=500).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_at_its_quota_is_paused_not_dropped() {
    let host = Host::new(
        limits(),
        LogOptions {
            quota_bytes: 16 * 1024,
            ..LogOptions::default()
        },
        &["full", "other"],
    );
    let mut g = host.guest("full").await;
    g.handshake(&[]).await;
    // Entries until the log refuses them; the connection stays open and silent.
    let mut next = 1;
    let mut paused = false;
    for _ in 0..200 {
        g.send(&batch(next, next + 49)).await;
        let got = tokio::time::timeout(Duration::from_secs(2), g.recv()).await;
        match got {
            Ok(Some(Message::Ack { upto })) => {
                assert_eq!(upto, next + 49);
                next += 50;
            }
            Err(_) => {
                paused = true;
                break;
            }
            Ok(other) => panic!("want ack or silence, got {other:?}"),
        }
    }
    assert!(paused, "the quota of 16 KiB never applied");
    let stats = host.link.stats("full").expect("stats");
    assert!(stats.quota_pauses >= 1, "{stats:?}");
    assert!(stats.connected, "the VM at its quota keeps its connection");
    // Another VM is not affected.
    stream_ok(&host, "other", 1, 100, 50).await;
    assert_eq!(host.seqs("other").len(), 100);
    assert_eq!(host.seqs("full").len() as u64, next - 1);
}

/// A guest whose values compress a thousandfold (zstd stores 200 KiB of one letter in
/// a few dozen bytes) is held to its quota by the bytes it sends, not by what they
/// compress to: replay and the API hold them decompressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressible_entries_hit_the_quota_by_their_decompressed_bytes() {
    const QUOTA: u64 = 1 << 20;
    let host = Host::new(
        limits(),
        LogOptions {
            quota_bytes: QUOTA,
            ..LogOptions::default()
        },
        &["zip"],
    );
    let value = format!("\"{}\"", "a".repeat(200 * 1024));
    let big = |seq: u64| Entry {
        new: Some(value.clone()),
        ..entry(seq)
    };
    let mut g = host.guest("zip").await;
    g.handshake(&[caps::SQLITE]).await;
    // 3 entries (600 KiB) a batch, 40 batches: 24 MiB sent, ~1% of it once compressed.
    let mut next = 1;
    let mut paused = false;
    for _ in 0..40 {
        g.send(&Message::Batch((next..next + 3).map(big).collect()))
            .await;
        match tokio::time::timeout(Duration::from_secs(2), g.recv()).await {
            Ok(Some(Message::Ack { upto })) => {
                assert_eq!(upto, next + 2);
                next += 3;
            }
            Err(_) => {
                paused = true;
                break;
            }
            Ok(other) => panic!("want ack or silence, got {other:?}"),
        }
    }
    let usage = host.log.usage("zip").expect("usage");
    assert!(
        paused,
        "the guest stored {} entries ({} bytes decompressed, {} on disk) past a quota of {QUOTA}",
        next - 1,
        usage.charged_bytes,
        usage.bytes
    );
    let stored: usize = host
        .log
        .query("zip", &Query::default())
        .expect("query")
        .iter()
        .map(|r| r.entry.new.as_ref().map_or(0, String::len))
        .sum();
    assert!(stored as u64 <= QUOTA, "{stored} bytes of values stored");
    assert!(usage.charged_bytes <= QUOTA, "{usage:?}");
    assert!(
        usage.bytes < usage.charged_bytes / 10,
        "the values did compress: {usage:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_replaces_the_old_one() {
    let host = Host::new(limits(), LogOptions::default(), &["vm1"]);
    let mut first = host.guest("vm1").await;
    first.handshake(&[]).await;
    first.send(&batch(1, 5)).await;
    assert_eq!(first.expect_ack().await, 5);
    let mut second = host.guest("vm1").await;
    assert_eq!(second.handshake(&[]).await.acked, 5);
    // The first connection is closed by the host.
    assert_eq!(first.recv().await, None);
    second.send(&batch(6, 9)).await;
    assert_eq!(second.expect_ack().await, 9);
    assert_eq!(host.link.stats("vm1").expect("stats").connections, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_reaches_the_dpa_and_returns_its_answer() {
    let host = Host::new(limits(), LogOptions::default(), &["weave1", "plain"]);
    assert!(matches!(
        host.link.apply("weave1", vec![entry(1)]).await,
        Err(ApplyError::NotConnected(_))
    ));
    let mut g = host.guest("weave1").await;
    g.handshake(&[caps::SQLITE, caps::APPLY]).await;
    let link = host.link.clone();
    let call = tokio::spawn(async move { link.apply("weave1", vec![entry(1), entry(2)]).await });
    let id = match g.recv().await {
        Some(Message::Apply(a)) => {
            assert_eq!(a.changes, vec![entry(1), entry(2)]);
            a.id
        }
        other => panic!("want apply, got {other:?}"),
    };
    // An answer to no request is ignored; the right one completes the call.
    g.send(&Message::Applied(Applied {
        id: id + 1000,
        applied: 9,
        error: None,
    }))
    .await;
    g.send(&Message::Applied(Applied {
        id,
        applied: 2,
        error: None,
    }))
    .await;
    let applied = call.await.expect("task").expect("applied");
    assert_eq!((applied.id, applied.applied), (id, 2));

    // A DPA that stays silent: the call times out, the connection stays.
    let started = Instant::now();
    assert!(matches!(
        host.link.apply("weave1", vec![entry(1)]).await,
        Err(ApplyError::Timeout { .. })
    ));
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(matches!(g.recv().await, Some(Message::Apply(_))));
    // A DPA without the apply capability is not asked.
    let mut p = host.guest("plain").await;
    p.handshake(&[caps::SQLITE]).await;
    assert!(matches!(
        host.link.apply("plain", vec![entry(1)]).await,
        Err(ApplyError::NotSupported(_))
    ));
    // Invalid changes never reach the guest.
    assert!(matches!(
        host.link.apply("weave1", vec![entry(0)]).await,
        Err(ApplyError::Invalid(_))
    ));
    // A DPA that disconnects while asked.
    let link = host.link.clone();
    let call = tokio::spawn(async move { link.apply("weave1", vec![entry(1)]).await });
    assert!(matches!(g.recv().await, Some(Message::Apply(_))));
    drop(g);
    assert!(matches!(
        call.await.expect("task"),
        Err(ApplyError::Disconnected(_))
    ));
}

/// Frames and entries per second through the handler into the log (rate limit
/// off), printed for docs/benchmarks.md; the guest keeps up to 8 batches in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_through_the_handler() {
    let host = Host::new(limits(), LogOptions::default(), &["bench"]);
    let mut g = host.guest("bench").await;
    g.handshake(&[]).await;
    for per in [1u64, 64, 512] {
        let frames = if per == 1 { 2000 } else { 200 };
        let first = host.log.last_seq("bench").expect("last") + 1;
        let started = Instant::now();
        let mut in_flight = 0;
        let mut acked = first - 1;
        let last = first + frames * per - 1;
        for i in 0..frames {
            let from = first + i * per;
            g.send(&batch(from, from + per - 1)).await;
            in_flight += 1;
            while in_flight >= 8 {
                let upto = g.expect_ack().await;
                // Coalesced batches are acknowledged together.
                in_flight = (from + per - 1 - upto).div_ceil(per);
                acked = upto;
            }
        }
        while acked < last {
            acked = g.expect_ack().await;
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "dpa link: {per:>3} entries/frame: {:>8.0} frames/s, {:>8.0} entries/s",
            frames as f64 / secs,
            (frames * per) as f64 / secs
        );
    }
    assert_eq!(
        host.seqs("bench").len() as u64,
        host.log.last_seq("bench").expect("last")
    );
}
