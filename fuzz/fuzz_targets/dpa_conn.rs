//! Feeds bytes a guest's DPA sends over its vsock connection to weftd's connection
//! handler (`weft_provenance::link::DpaLink::accept`: the hello with its timeout, batches checked
//! for sequence, appends, acks, the replies it writes back), then closes the
//! connection. The sink is an in-memory log with the provenance log's sequence rules
//! (entries at or below the last durable seq are skipped, a gap is refused). It must
//! never panic; the log only ever holds seqs 1, 2, 3, … in order; every reply weftd
//! writes decodes; the connection ends once the guest's side is closed.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_provenance::link::{DpaLink, EntrySink, LinkLimits};
use weft_provenance::log::ProvenanceError;
use weft_dpa::proto::{Decoder, Entry};

#[derive(Default)]
struct Log(Mutex<Vec<u64>>);

impl EntrySink for Log {
    fn append(&self, vm: &str, _at: i64, entries: &[Entry]) -> Result<u64, ProvenanceError> {
        let mut log = self.0.lock().expect("lock");
        let last = log.last().copied().unwrap_or(0);
        let fresh: Vec<u64> = entries
            .iter()
            .map(|e| e.seq)
            .filter(|s| *s > last)
            .collect();
        if let Some(&first) = fresh.first() {
            if first != last + 1 {
                return Err(ProvenanceError::Gap {
                    vm: vm.to_string(),
                    last,
                    got: first,
                });
            }
        }
        for s in fresh {
            let prev = log.last().copied().unwrap_or(0);
            assert_eq!(
                s,
                prev + 1,
                "the handler passed non-consecutive seqs {entries:?}"
            );
            log.push(s);
        }
        Ok(log.last().copied().unwrap_or(0))
    }
    fn last_seq(&self, _vm: &str) -> Result<u64, ProvenanceError> {
        Ok(self.0.lock().expect("lock").last().copied().unwrap_or(0))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let log = Arc::new(Log::default());
        let limits = LinkLimits {
            entries_per_sec: 0,
            bytes_per_sec: 0,
            hello_timeout: Duration::from_secs(5),
            quota_pause: Duration::from_millis(1),
            apply_timeout: Duration::from_secs(1),
        };
        let link = DpaLink::new(log.clone(), limits);
        let (mut guest, host) = tokio::io::duplex(1 << 16);
        link.accept("vm", host);
        // Write and read at once: weftd's replies must not stall the guest's writes.
        let (mut rd, mut wr) = tokio::io::split(&mut guest);
        let write = async {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let read = async {
            let mut replies = Vec::new();
            let _ = rd.read_to_end(&mut replies).await;
            replies
        };
        let ((), replies) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(write, read) })
                .await
                .expect("the connection did not end after the guest closed it");
        let mut d = Decoder::new();
        d.feed(&replies);
        while let Some(m) = d.next_message().expect("weftd's replies decode") {
            let _ = m;
        }
        link.forget("vm");
        let _ = &log;
    });
});
