//! The durable spool: every entry from the moment it gets its sequence number until the
//! host acknowledged it, plus the capture state that must move in step with the entries
//! (SQLite drain marks, the last known JSON documents and key-value maps).
//!
//! On disk: a directory of segments `<gen:016x>.seg`. A segment is the magic line
//! [`MAGIC`] followed by records `len: u32 LE | crc: u32 LE (CRC-32C of payload) |
//! payload` where the payload is a postcard-encoded [`Record`]. A segment starts with a
//! `Header` holding the whole [`State`] as of its creation, so older segments can be
//! deleted once acknowledged without losing state; `Append` records carry entries and
//! the state updates that go with them, in one write, fsynced before the entries are
//! sent or the state is used. New segments are written under a temporary name, fsynced
//! and renamed, so a crash leaves at most a torn last record in the last segment, which
//! opening truncates.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::wake::Notify;
use super::Error;
use crate::proto::Entry;

/// First bytes of every segment; the version is bumped on any incompatible change.
pub const MAGIC: &[u8; 16] = b"WEFTDPA-SPOOL-1\n";
const REC_HEADER: usize = 8;

/// The drain position of one SQLite source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqliteMark {
    /// The capture table's instance id (a new database file gets a new one).
    pub instance: String,
    /// The highest capture row id held by the spool.
    pub mark: i64,
    /// The last capture row id of the window of whole transactions that `tx` covers
    /// (the highest id committed when the window was read). Earlier agents kept the
    /// trigger epoch in this place (same encoding): such a value starts one extra tx id
    /// after an upgrade, nothing more.
    pub end: i64,
    /// The transaction id given to that window.
    pub tx: u64,
}

/// Everything the agent must remember across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The sequence number of the next entry.
    pub next_seq: u64,
    /// The next transaction id.
    pub next_tx: u64,
    /// Drain marks of SQLite sources, by database path.
    pub sqlite: BTreeMap<String, SqliteMark>,
    /// Last known JSON documents (JSON text), by file path.
    pub json: BTreeMap<String, String>,
    /// Last known key-value maps, by source path.
    pub kv: BTreeMap<String, BTreeMap<String, String>>,
}

impl Default for State {
    fn default() -> Self {
        State {
            next_seq: 1,
            next_tx: 1,
            sqlite: BTreeMap::new(),
            json: BTreeMap::new(),
            kv: BTreeMap::new(),
        }
    }
}

/// A change of [`State`] recorded together with the entries it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Update {
    /// A SQLite source's new drain position.
    Sqlite {
        /// The database path.
        source: String,
        /// Its mark.
        mark: SqliteMark,
    },
    /// A JSON file's last known document (`None`: the file is gone).
    Json {
        /// The file path.
        source: String,
        /// The document's text.
        doc: Option<String>,
    },
    /// A key-value source's last known map.
    Kv {
        /// The source path.
        source: String,
        /// Every key and value (`None`: forget the source).
        map: Option<BTreeMap<String, String>>,
    },
    /// The next transaction id.
    NextTx(u64),
}

#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Header(State),
    Append {
        entries: Vec<Entry>,
        updates: Vec<Update>,
    },
    Jump {
        next_seq: u64,
    },
}

impl State {
    fn apply(&mut self, u: &Update) {
        match u {
            Update::Sqlite { source, mark } => {
                self.sqlite.insert(source.clone(), mark.clone());
            }
            Update::Json { source, doc } => match doc {
                Some(d) => {
                    self.json.insert(source.clone(), d.clone());
                }
                None => {
                    self.json.remove(source);
                }
            },
            Update::Kv { source, map } => match map {
                Some(m) => {
                    self.kv.insert(source.clone(), m.clone());
                }
                None => {
                    self.kv.remove(source);
                }
            },
            Update::NextTx(n) => self.next_tx = (*n).max(self.next_tx),
        }
    }
}

#[derive(Debug)]
struct Segment {
    gen: u64,
    path: PathBuf,
    file: File,
    bytes: u64,
    /// The highest sequence number this segment holds, or the one before its first.
    last_seq: u64,
    has_entries: bool,
}

#[derive(Debug, Clone, Copy)]
struct RecIdx {
    last: u64,
    gen: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    state: State,
    segments: Vec<Segment>,
    records: VecDeque<RecIdx>,
    /// SQLite marks of records not yet acknowledged: (last seq, marks).
    pending_marks: VecDeque<(u64, Vec<(String, i64)>)>,
    acked_marks: BTreeMap<String, i64>,
    acked: u64,
    total_bytes: u64,
}

/// The spool; shared by the capture loop (the only appender) and the client.
#[derive(Debug)]
pub struct Spool {
    inner: Mutex<Inner>,
    /// Poked on every append.
    pub notify: Notify,
}

fn seg_name(gen: u64) -> String {
    format!("{gen:016x}.seg")
}

fn fsync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("cannot sync directory {}", dir.display()), e))
}

fn frame(rec: &Record) -> Vec<u8> {
    let payload = postcard::to_allocvec(rec).unwrap_or_default();
    let mut out = Vec::with_capacity(REC_HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Parses the record at `buf[at..]`: `None` when it is torn or damaged.
fn parse_at(buf: &[u8], at: usize) -> Option<(Record, usize)> {
    let head = buf.get(at..at + REC_HEADER)?;
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    let payload = buf.get(at + REC_HEADER..at + REC_HEADER + len)?;
    if crc32c::crc32c(payload) != crc {
        return None;
    }
    let rec: Record = postcard::from_bytes(payload).ok()?;
    Some((rec, REC_HEADER + len))
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, repairing a torn tail.
    pub fn open(dir: &Path, max_bytes: u64, segment_bytes: u64) -> Result<Spool, Error> {
        fs::create_dir_all(dir).map_err(|e| {
            Error::io(
                format!("cannot create spool directory {}", dir.display()),
                e,
            )
        })?;
        let mut gens = Vec::new();
        let list = fs::read_dir(dir)
            .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
        for ent in list {
            let ent = ent.map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
            let name = ent.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(ent.path());
            } else if let Some(hex) = name.strip_suffix(".seg") {
                match u64::from_str_radix(hex, 16) {
                    Ok(g) if hex.len() == 16 => gens.push(g),
                    _ => {
                        tracing::warn!(file = %name, "ignoring a file that is not a spool segment")
                    }
                }
            }
        }
        gens.sort_unstable();
        let mut inner = Inner {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
            state: State::default(),
            segments: Vec::new(),
            records: VecDeque::new(),
            pending_marks: VecDeque::new(),
            acked_marks: BTreeMap::new(),
            acked: 0,
            total_bytes: 0,
        };
        if gens.is_empty() {
            inner.new_segment(1)?;
        }
        let count = gens.len();
        for (i, gen) in gens.into_iter().enumerate() {
            inner.load_segment(gen, i == 0, i + 1 == count)?;
        }
        Ok(Spool {
            inner: Mutex::new(inner),
            notify: Notify::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sequence number the next entry will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().state.next_seq
    }

    /// The next transaction id.
    pub fn next_tx(&self) -> u64 {
        self.lock().state.next_tx
    }

    /// The highest sequence number the host acknowledged in this run.
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// A SQLite source's drain position.
    pub fn sqlite_mark(&self, source: &str) -> Option<SqliteMark> {
        self.lock().state.sqlite.get(source).cloned()
    }

    /// A JSON source's last known document.
    pub fn json_doc(&self, source: &str) -> Option<String> {
        self.lock().state.json.get(source).cloned()
    }

    /// A key-value source's last known map.
    pub fn kv_map(&self, source: &str) -> Option<BTreeMap<String, String>> {
        self.lock().state.kv.get(source).cloned()
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.lock().total_bytes
    }

    /// Whether the spool reached its bound (sources should wait).
    pub fn is_full(&self) -> bool {
        let i = self.lock();
        i.total_bytes >= i.max_bytes
    }

    /// For each SQLite source, the highest capture row id whose entries the host has
    /// acknowledged (capture rows up to it may be deleted).
    pub fn acked_marks(&self) -> BTreeMap<String, i64> {
        self.lock().acked_marks.clone()
    }

    /// Gives `entries` consecutive sequence numbers, writes them with `updates` as one
    /// record and fsyncs it. Returns the sequence numbers given, `(first, last)`, or
    /// `None` when nothing was written.
    pub fn append(
        &self,
        mut entries: Vec<Entry>,
        updates: Vec<Update>,
    ) -> Result<Option<(u64, u64)>, Error> {
        if entries.is_empty() && updates.is_empty() {
            return Ok(None);
        }
        let mut inner = self.lock();
        inner.maybe_rotate()?;
        let first = inner.state.next_seq;
        for (i, e) in entries.iter_mut().enumerate() {
            e.seq = first + i as u64;
        }
        let n = entries.len() as u64;
        let rec = Record::Append { entries, updates };
        let (offset, len) = inner.write_record(&rec)?;
        let Record::Append { updates, .. } = rec else {
            return Ok(None);
        };
        inner.state.next_seq = first + n;
        let marks: Vec<(String, i64)> = updates
            .iter()
            .filter_map(|u| match u {
                Update::Sqlite { source, mark } => Some((source.clone(), mark.mark)),
                _ => None,
            })
            .collect();
        for u in &updates {
            inner.state.apply(u);
        }
        let last = first + n - 1;
        let gen = inner.active().gen;
        if n > 0 {
            inner.records.push_back(RecIdx {
                last,
                gen,
                offset,
                len,
            });
            let seg = inner.active_mut();
            seg.last_seq = last;
            seg.has_entries = true;
        }
        if !marks.is_empty() {
            inner.pending_marks.push_back((first + n - 1, marks));
            let acked = inner.acked;
            inner.fold_acked(acked);
        }
        drop(inner);
        self.notify.poke();
        Ok((n > 0).then_some((first, last)))
    }

    /// Entries from `from` on, at most `max`.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<Entry>, Error> {
        let inner = self.lock();
        let start = inner.records.partition_point(|r| r.last < from);
        let mut out = Vec::new();
        for r in inner.records.range(start..) {
            if out.len() >= max {
                break;
            }
            let seg = inner
                .segments
                .iter()
                .find(|s| s.gen == r.gen)
                .ok_or_else(|| Error::Spool(format!("segment {} is gone", r.gen)))?;
            let mut buf = vec![0u8; r.len as usize];
            seg.file
                .read_exact_at(&mut buf, r.offset)
                .map_err(|e| Error::io(format!("cannot read {}", seg.path.display()), e))?;
            let Some((Record::Append { entries, .. }, _)) = parse_at(&buf, 0) else {
                return Err(Error::Spool(format!(
                    "record at {} of {} does not read back",
                    r.offset,
                    seg.path.display()
                )));
            };
            let room = max - out.len();
            out.extend(entries.into_iter().filter(|e| e.seq >= from).take(room));
        }
        Ok(out)
    }

    /// The host holds every entry up to `upto`: deletes sealed segments it covers.
    pub fn ack(&self, upto: u64) -> Result<(), Error> {
        let mut inner = self.lock();
        if upto <= inner.acked {
            return Ok(());
        }
        inner.acked = upto;
        inner.fold_acked(upto);
        while inner.segments.len() > 1 && inner.segments[0].last_seq <= upto {
            let seg = inner.segments.remove(0);
            inner.total_bytes -= seg.bytes;
            inner.records.retain(|r| r.gen != seg.gen);
            if let Err(e) = fs::remove_file(&seg.path) {
                tracing::warn!(segment = %seg.path.display(), "cannot delete an acknowledged spool segment: {e}");
            }
        }
        Ok(())
    }

    /// Moves the next sequence number forward (the host holds more than this spool
    /// does: the spool was lost). Recorded durably.
    pub fn jump_to(&self, next_seq: u64) -> Result<(), Error> {
        let mut inner = self.lock();
        if next_seq <= inner.state.next_seq {
            return Ok(());
        }
        inner.write_record(&Record::Jump { next_seq })?;
        inner.state.next_seq = next_seq;
        let seg = inner.active_mut();
        seg.last_seq = next_seq - 1;
        Ok(())
    }
}

impl Inner {
    fn active(&self) -> &Segment {
        &self.segments[self.segments.len() - 1]
    }

    fn active_mut(&mut self) -> &mut Segment {
        let n = self.segments.len();
        &mut self.segments[n - 1]
    }

    fn fold_acked(&mut self, upto: u64) {
        while let Some((last, _)) = self.pending_marks.front() {
            if *last > upto {
                break;
            }
            if let Some((_, marks)) = self.pending_marks.pop_front() {
                for (s, m) in marks {
                    let e = self.acked_marks.entry(s).or_insert(m);
                    *e = (*e).max(m);
                }
            }
        }
    }

    /// Appends one record to the active segment and fsyncs it; returns its offset and
    /// payload length. On failure the segment is cut back to where it was.
    fn write_record(&mut self, rec: &Record) -> Result<(u64, u32), Error> {
        let bytes = frame(rec);
        let seg = self.active_mut();
        let offset = seg.bytes;
        let res = seg
            .file
            .write_all_at(&bytes, offset)
            .and_then(|()| seg.file.sync_data());
        if let Err(e) = res {
            let _ = seg.file.set_len(offset);
            return Err(Error::io(
                format!("cannot write to {}", seg.path.display()),
                e,
            ));
        }
        seg.bytes += bytes.len() as u64;
        self.total_bytes += bytes.len() as u64;
        Ok((offset, bytes.len() as u32))
    }

    fn maybe_rotate(&mut self) -> Result<(), Error> {
        let a = self.active();
        if a.has_entries && a.bytes >= self.segment_bytes {
            let gen = a.gen + 1;
            self.new_segment(gen)?;
        }
        Ok(())
    }

    /// Writes a new segment holding the current state and makes it the active one.
    fn new_segment(&mut self, gen: u64) -> Result<(), Error> {
        let path = self.dir.join(seg_name(gen));
        let tmp = self.dir.join(format!("{}.tmp", seg_name(gen)));
        let mut data = MAGIC.to_vec();
        data.extend(frame(&Record::Header(self.state.clone())));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write()
            .map_err(|e| Error::io(format!("cannot create spool segment {}", path.display()), e))?;
        fsync_dir(&self.dir)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        self.total_bytes += data.len() as u64;
        self.segments.push(Segment {
            gen,
            path,
            file,
            bytes: data.len() as u64,
            last_seq: self.state.next_seq - 1,
            has_entries: false,
        });
        Ok(())
    }

    fn load_segment(&mut self, gen: u64, first: bool, last: bool) -> Result<(), Error> {
        let path = self.dir.join(seg_name(gen));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        let buf =
            fs::read(&path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        if buf.get(..MAGIC.len()) != Some(&MAGIC[..]) {
            return Err(Error::Spool(format!(
                "{} is not a weft-dpa spool segment of this version",
                path.display()
            )));
        }
        let mut at = MAGIC.len();
        let mut seg = Segment {
            gen,
            path: path.clone(),
            file,
            bytes: 0,
            last_seq: 0,
            has_entries: false,
        };
        let mut header = true;
        while at < buf.len() {
            let Some((rec, size)) = parse_at(&buf, at) else {
                if !last {
                    return Err(Error::Spool(format!(
                        "{} is damaged at byte {at}; it was sealed, so this is not a crash's torn write: \
                         move the spool away to start afresh (entries not yet sent are lost)",
                        path.display()
                    )));
                }
                tracing::warn!(segment = %path.display(), offset = at, dropped = buf.len() - at,
                    "cutting a torn record off the spool's tail (a crash during a write)");
                seg.file
                    .set_len(at as u64)
                    .and_then(|()| seg.file.sync_all())
                    .map_err(|e| Error::io(format!("cannot repair {}", path.display()), e))?;
                break;
            };
            match rec {
                Record::Header(state) if header => {
                    if first {
                        self.acked_marks = state
                            .sqlite
                            .iter()
                            .map(|(k, v)| (k.clone(), v.mark))
                            .collect();
                    }
                    self.state = state;
                    seg.last_seq = self.state.next_seq - 1;
                }
                Record::Header(_) => {
                    return Err(Error::Spool(format!(
                        "{} has a second header",
                        path.display()
                    )))
                }
                _ if header => {
                    return Err(Error::Spool(format!(
                        "{} does not start with a header",
                        path.display()
                    )))
                }
                Record::Append { entries, updates } => {
                    let first_seq = self.state.next_seq;
                    for (i, e) in entries.iter().enumerate() {
                        if e.seq != first_seq + i as u64 {
                            return Err(Error::Spool(format!(
                                "{} holds entry {} where {} was expected",
                                path.display(),
                                e.seq,
                                first_seq + i as u64
                            )));
                        }
                    }
                    let n = entries.len() as u64;
                    self.state.next_seq += n;
                    let marks: Vec<(String, i64)> = updates
                        .iter()
                        .filter_map(|u| match u {
                            Update::Sqlite { source, mark } => Some((source.clone(), mark.mark)),
                            _ => None,
                        })
                        .collect();
                    for u in &updates {
                        self.state.apply(u);
                    }
                    if n > 0 {
                        self.records.push_back(RecIdx {
                            last: first_seq + n - 1,
                            gen,
                            offset: at as u64,
                            len: size as u32,
                        });
                        seg.has_entries = true;
                    }
                    seg.last_seq = self.state.next_seq - 1;
                    if !marks.is_empty() {
                        self.pending_marks
                            .push_back((self.state.next_seq - 1, marks));
                    }
                }
                Record::Jump { next_seq } => {
                    self.state.next_seq = self.state.next_seq.max(next_seq);
                    seg.last_seq = self.state.next_seq - 1;
                }
            }
            header = false;
            at += size;
        }
        if header {
            return Err(Error::Spool(format!("{} has no header", path.display())));
        }
        seg.bytes = at as u64;
        self.total_bytes += seg.bytes;
        self.segments.push(seg);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{DataType, Operation};

    fn entry(key: &str) -> Entry {
        Entry {
            seq: 0,
            guest_time_us: 1,
            data_type: DataType::Kv,
            op: Operation::Insert,
            source: "/etc/app.env".into(),
            collection: String::new(),
            key: key.into(),
            old: None,
            new: Some("\"v\"".into()),
            tx: None,
        }
    }

    fn mark(m: i64) -> Update {
        Update::Sqlite {
            source: "/db".into(),
            mark: SqliteMark {
                instance: "i".into(),
                mark: m,
                end: 1,
                tx: 1,
            },
        }
    }

    #[test]
    fn sequence_numbers_and_state_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path(), 1 << 20, 4096).unwrap();
            assert_eq!(
                s.append(vec![entry("a"), entry("b")], vec![mark(5)])
                    .unwrap(),
                Some((1, 2))
            );
            assert_eq!(
                s.append(vec![entry("c")], vec![mark(9)]).unwrap(),
                Some((3, 3))
            );
        }
        let s = Spool::open(dir.path(), 1 << 20, 4096).unwrap();
        assert_eq!(s.next_seq(), 4);
        assert_eq!(s.sqlite_mark("/db").unwrap().mark, 9);
        let got = s.read_from(2, 10).unwrap();
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert!(s.acked_marks().is_empty(), "nothing acknowledged yet");
        s.ack(2).unwrap();
        assert_eq!(s.acked_marks()["/db"], 5);
        s.ack(3).unwrap();
        assert_eq!(s.acked_marks()["/db"], 9);
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
            s.append(vec![entry("a")], vec![]).unwrap();
            s.append(vec![entry("b")], vec![]).unwrap();
        }
        let seg = dir.path().join(seg_name(1));
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let s = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!(s.next_seq(), 2, "the torn entry 2 is gone, entry 1 kept");
        assert_eq!(s.append(vec![entry("c")], vec![]).unwrap(), Some((2, 2)));
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let keys: Vec<_> = s
            .read_from(1, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, ["a", "c"]);
    }

    #[test]
    fn acknowledged_segments_are_deleted_and_state_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20, 256).unwrap();
        let doc = Update::Json {
            source: "/d.json".into(),
            doc: Some("{\"a\":1}".into()),
        };
        s.append(vec![entry("x")], vec![doc]).unwrap();
        for i in 0..40 {
            s.append(vec![entry(&format!("k{i}"))], vec![mark(i)])
                .unwrap();
        }
        let segs = || fs::read_dir(dir.path()).unwrap().count();
        assert!(segs() > 3, "small segments rotate");
        let before = s.bytes();
        s.ack(41).unwrap();
        assert_eq!(segs(), 1, "only the active segment stays");
        assert!(s.bytes() < before);
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20, 256).unwrap();
        assert_eq!(s.next_seq(), 42);
        assert_eq!(s.json_doc("/d.json").as_deref(), Some("{\"a\":1}"));
        assert_eq!(s.sqlite_mark("/db").unwrap().mark, 39);
        assert!(s.acked_marks().get("/db").copied().unwrap_or(0) <= 39);
    }

    #[test]
    fn full_means_over_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 300, 200).unwrap();
        assert!(!s.is_full());
        while !s.is_full() {
            s.append(vec![entry("k")], vec![]).unwrap();
        }
        let n = s.next_seq() - 1;
        s.ack(n).unwrap();
        assert!(!s.is_full(), "acks free space");
    }

    #[test]
    fn a_jump_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        s.jump_to(100).unwrap();
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!(s.next_seq(), 100);
    }
}
