//! The capture loop: watches sources (inotify, a poll timer, SIGHUP and the
//! configuration file), turns their changes into entries and appends them to the spool.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use super::config::{Config, KvFormat};
use super::files::{self, Scan};
use super::jsonptr;
use super::spool::{Spool, SqliteMark, Update};
use super::sqlite::Db;
use super::wake::Waker;
use super::{Error, Options};
use crate::proto::{self, DataType, Entry, Operation};

const DIR_MASK: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_MODIFY)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF);

/// Events that mean "a write completed" for file sources (a plain modify is a write
/// still in progress).
const DONE_MASK: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_DELETE);

#[derive(Debug)]
struct DbSource {
    db: Db,
    dirty: bool,
    deleted_upto: i64,
}

#[derive(Debug)]
struct FileSource {
    kv: Option<KvFormat>,
    dirty: bool,
}

/// The capture loop's state.
#[derive(Debug)]
pub struct Capture {
    opts: Options,
    config: Config,
    shared: Arc<RwLock<Config>>,
    spool: Arc<Spool>,
    waker: Waker,
    inotify: Inotify,
    by_wd: HashMap<WatchDescriptor, PathBuf>,
    by_dir: HashMap<PathBuf, WatchDescriptor>,
    dbs: BTreeMap<String, DbSource>,
    /// Removed SQLite sources whose triggers are still to be dropped (the agent writes
    /// only when the database is quiet).
    leaving: BTreeMap<String, Db>,
    files: BTreeMap<String, FileSource>,
    hup: Arc<AtomicBool>,
    last_rescan: Instant,
    full: bool,
    last_error: BTreeMap<String, String>,
    /// Poll every millisecond until then: a database file was written, and the
    /// commit becomes visible a moment after the write inotify reports.
    fast_until: Option<Instant>,
}

/// How long the loop polls fast after a database file was written.
const FAST_WINDOW: Duration = Duration::from_millis(10);
const FAST_POLL: Duration = Duration::from_millis(1);

impl Capture {
    pub(crate) fn new(
        opts: Options,
        config: Config,
        shared: Arc<RwLock<Config>>,
        spool: Arc<Spool>,
        waker: Waker,
    ) -> Result<Capture, Error> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| Error::io("cannot start inotify", e.into()))?;
        let hup = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())
            .map_err(|e| Error::io("cannot handle SIGHUP", e))?;
        let pipe = waker
            .sender()
            .try_clone()
            .map_err(|e| Error::io("cannot clone the wake socket", e))?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, pipe)
            .map_err(|e| Error::io("cannot handle SIGHUP", e))?;
        let mut c = Capture {
            opts,
            config: Config::default(),
            shared,
            spool,
            waker,
            inotify,
            by_wd: HashMap::new(),
            by_dir: HashMap::new(),
            dbs: BTreeMap::new(),
            leaving: BTreeMap::new(),
            files: BTreeMap::new(),
            hup,
            last_rescan: Instant::now(),
            full: false,
            last_error: BTreeMap::new(),
            fast_until: None,
        };
        c.set_config(config);
        Ok(c)
    }

    /// Runs until a fatal error.
    pub fn run(&mut self) -> Result<(), Error> {
        loop {
            self.step()?;
            self.wait();
        }
    }

    fn wait(&mut self) {
        let mut timeout = Duration::from_millis(self.config.poll_interval_ms);
        if self.fast_until.is_some_and(|t| Instant::now() < t) {
            timeout = timeout.min(FAST_POLL);
        }
        let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [
            PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.waker.fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, t) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                tracing::warn!("poll failed: {e}");
                std::thread::sleep(timeout);
            }
        }
        self.waker.drain();
    }

    /// One round: events, reloads, acks, drains.
    fn step(&mut self) -> Result<(), Error> {
        if self.hup.swap(false, Ordering::SeqCst) {
            tracing::info!("SIGHUP: reloading the configuration");
            self.reload();
        }
        self.read_events();
        let rescan = self.config.rescan_interval_ms;
        if rescan > 0 && self.last_rescan.elapsed() >= Duration::from_millis(rescan) {
            self.last_rescan = Instant::now();
            self.update_watches();
            for f in self.files.values_mut() {
                f.dirty = true;
            }
            for d in self.dbs.values_mut() {
                d.dirty = true;
            }
        }
        self.trim_capture_tables();
        self.drop_leaving_triggers();
        let full = self.spool.is_full();
        if full != self.full {
            self.full = full;
            if full {
                tracing::warn!(
                    bytes = self.spool.bytes(),
                    limit = self.config.spool_max_bytes,
                    "the spool is full: sources wait (SQLite changes stay in their capture tables) until the host acknowledges entries"
                );
            } else {
                tracing::info!("the spool has room again: capture resumes");
            }
        }
        if full {
            return Ok(());
        }
        let names: Vec<String> = self.dbs.keys().cloned().collect();
        for name in names {
            let res = self.drain_db(&name);
            self.report(&name, res)?;
        }
        let names: Vec<String> = self
            .files
            .iter()
            .filter(|(_, f)| f.dirty)
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let res = self.scan_file(&name);
            self.report(&name, res)?;
        }
        Ok(())
    }

    /// Logs a source's error once (until it changes or clears); a spool write error
    /// is logged the same way and retried, other errors too: a source never stops the
    /// agent.
    fn report(&mut self, source: &str, res: Result<(), Error>) -> Result<(), Error> {
        match res {
            Ok(()) => {
                if self.last_error.remove(source).is_some() {
                    tracing::info!(source, "source is fine again");
                }
            }
            Err(e) => {
                let msg = error_chain(&e);
                if self.last_error.get(source) != Some(&msg) {
                    tracing::warn!(source, "{msg}; retrying");
                    self.last_error.insert(source.to_string(), msg);
                }
            }
        }
        Ok(())
    }

    fn drain_db(&mut self, name: &str) -> Result<(), Error> {
        let batch = self.config.batch_entries;
        let Some(src) = self.dbs.get_mut(name) else {
            return Ok(());
        };
        if !src.db.ensure()? {
            return Ok(());
        }
        let changed = src.db.changed()?;
        if !changed && !src.dirty {
            return Ok(());
        }
        src.dirty = false;
        loop {
            let mut mark = self.spool.sqlite_mark(name).unwrap_or_default();
            let mut drained = match src.db.drain(mark.mark, batch) {
                Ok(d) => d,
                Err(e) if e.is_busy() => {
                    src.dirty = true;
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if drained.instance != mark.instance {
                if !mark.instance.is_empty() {
                    tracing::warn!(source = name, "the database's capture table is new (the file was replaced): draining it from the start");
                }
                mark = SqliteMark {
                    instance: drained.instance.clone(),
                    mark: 0,
                    end: 0,
                    tx: 0,
                };
                drained = src.db.drain(0, batch)?;
            }
            let n = drained.rows.len();
            if n == 0 {
                return Ok(());
            }
            let mut next_tx = self.spool.next_tx();
            let mut entries = Vec::with_capacity(n);
            for r in drained.rows {
                // Rows up to the end of the window the current tx id covers are the
                // rest of its transactions (a batch cut them); later rows are whole
                // transactions committed since, up to this read's end.
                if mark.tx == 0 || r.id > mark.end {
                    mark.tx = next_tx;
                    next_tx += 1;
                    mark.end = drained.end;
                }
                mark.mark = r.id;
                let (key, old, new) = match r.op {
                    Operation::Schema => (String::new(), None, r.new),
                    _ => (r.pk, r.old, r.new),
                };
                let e = Entry {
                    seq: 0,
                    guest_time_us: r.time_us,
                    data_type: DataType::Sqlite,
                    op: r.op,
                    source: name.to_string(),
                    collection: r.table,
                    key,
                    old,
                    new,
                    tx: Some(mark.tx),
                };
                if let Some(e) = sanitize(e) {
                    entries.push(e);
                }
            }
            self.spool.append(
                entries,
                vec![
                    Update::Sqlite {
                        source: name.to_string(),
                        mark,
                    },
                    Update::NextTx(next_tx),
                ],
            )?;
            if n < batch || self.spool.is_full() {
                return Ok(());
            }
        }
    }

    fn scan_file(&mut self, name: &str) -> Result<(), Error> {
        let Some(src) = self.files.get_mut(name) else {
            return Ok(());
        };
        src.dirty = false;
        let scan = match src.kv {
            None => files::scan_json(name, self.spool.json_doc(name).as_deref()),
            Some(fmt) => {
                files::scan_kv(name, fmt == KvFormat::Dir, self.spool.kv_map(name).as_ref())
            }
        };
        let scan = match scan {
            Ok(s) => s,
            Err(e) => {
                // Retried at the next event or rescan.
                return Err(e);
            }
        };
        if let Some(Scan { entries, updates }) = scan {
            let entries = entries.into_iter().filter_map(sanitize).collect();
            if let Err(e) = self.spool.append(entries, updates) {
                if let Some(src) = self.files.get_mut(name) {
                    src.dirty = true;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Drops the triggers of removed sources once their databases allow it.
    fn drop_leaving_triggers(&mut self) {
        self.leaving.retain(|name, db| match db.uninstall() {
            Ok(done) => !done,
            Err(e) => {
                tracing::warn!(source = %name, "{}", error_chain(&e));
                false
            }
        });
    }

    /// Deletes capture rows whose entries the host acknowledged.
    fn trim_capture_tables(&mut self) {
        let marks = self.spool.acked_marks();
        for (name, src) in &mut self.dbs {
            let Some(&m) = marks.get(name) else { continue };
            if m > src.deleted_upto {
                match src.db.delete_upto(m) {
                    Ok(true) => src.deleted_upto = m,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(source = %name, "cannot trim the capture table yet: {e}")
                    }
                }
            }
        }
    }

    fn read_events(&mut self) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(ev) => ev,
                Err(Errno::EAGAIN) => return,
                Err(e) => {
                    tracing::warn!("cannot read inotify events: {e}");
                    return;
                }
            };
            if events.is_empty() {
                return;
            }
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    tracing::info!("inotify queue overflow: rescanning every source");
                    self.files.values_mut().for_each(|f| f.dirty = true);
                    self.dbs.values_mut().for_each(|d| d.dirty = true);
                    continue;
                }
                let Some(dir) = self.by_wd.get(&ev.wd).cloned() else {
                    continue;
                };
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.by_wd.remove(&ev.wd);
                    self.by_dir.remove(&dir);
                    continue;
                }
                let path = match &ev.name {
                    Some(n) => dir.join(n),
                    None => dir.clone(),
                };
                self.dispatch(&dir, ev.name.as_deref(), &path, ev.mask);
            }
        }
    }

    fn dispatch(&mut self, dir: &Path, name: Option<&OsStr>, path: &Path, mask: AddWatchFlags) {
        if path == self.opts.config_path && mask.intersects(DONE_MASK) {
            tracing::info!(config = %path.display(), "configuration file changed: reloading");
            self.reload();
            return;
        }
        if mask.contains(AddWatchFlags::IN_CREATE) && mask.contains(AddWatchFlags::IN_ISDIR) {
            self.update_watches();
        }
        for (db, src) in &mut self.dbs {
            let p = Path::new(db);
            if p.parent() == Some(dir) {
                if let (Some(n), Some(f)) = (name, p.file_name()) {
                    if n.as_encoded_bytes().starts_with(f.as_encoded_bytes()) {
                        src.dirty = true;
                        self.fast_until = Some(Instant::now() + FAST_WINDOW);
                    }
                }
            }
        }
        for (file, src) in &mut self.files {
            let p = Path::new(file);
            let hit = match src.kv {
                Some(KvFormat::Dir) => {
                    (p == dir
                        && name.is_some_and(|n| files::is_dir_key(&n.to_string_lossy()))
                        && mask.intersects(DONE_MASK))
                        || p == path
                }
                _ => p == path && mask.intersects(DONE_MASK),
            };
            if hit {
                src.dirty = true;
                if matches!(src.kv, Some(KvFormat::Dir)) && p == path {
                    // The directory itself appeared or went: its watch follows.
                    self.last_rescan = Instant::now() - Duration::from_secs(3600);
                }
            }
        }
    }

    fn wanted_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        let parent = |p: &Path| p.parent().map(Path::to_path_buf);
        dirs.extend(parent(&self.opts.config_path));
        for s in &self.config.sqlite {
            dirs.extend(parent(&s.path));
        }
        for s in &self.config.json {
            dirs.extend(parent(&s.path));
        }
        for s in &self.config.kv {
            dirs.extend(parent(&s.path));
            if s.format == KvFormat::Dir {
                dirs.push(s.path.clone());
            }
        }
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Adds watches for directories that exist now, drops those no longer needed.
    fn update_watches(&mut self) {
        let wanted = self.wanted_dirs();
        let stale: Vec<PathBuf> = self
            .by_dir
            .keys()
            .filter(|d| !wanted.contains(d))
            .cloned()
            .collect();
        for d in stale {
            if let Some(wd) = self.by_dir.remove(&d) {
                self.by_wd.remove(&wd);
                let _ = self.inotify.rm_watch(wd);
            }
        }
        for d in wanted {
            if self.by_dir.contains_key(&d) {
                continue;
            }
            match self.inotify.add_watch(&d, DIR_MASK) {
                Ok(wd) => {
                    tracing::debug!(dir = %d.display(), "watching");
                    self.by_wd.insert(wd, d.clone());
                    self.by_dir.insert(d, wd);
                }
                Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => {}
                Err(e) => tracing::warn!(dir = %d.display(), "cannot watch: {e}"),
            }
        }
    }

    fn reload(&mut self) {
        match self.opts.load() {
            Ok(new) => {
                if new.spool_dir != self.config.spool_dir
                    || new.connect != self.config.connect
                    || new.spool_max_bytes != self.config.spool_max_bytes
                    || new.segment_bytes != self.config.segment_bytes
                {
                    tracing::warn!("spool_dir, spool_max_bytes, segment_bytes and connect take effect at the next start");
                }
                self.set_config(new);
            }
            Err(e) => tracing::warn!(
                "configuration not reloaded, the previous one stays: {}",
                error_chain(&e)
            ),
        }
    }

    /// Makes `new` the configuration: sources added and removed, watches updated.
    fn set_config(&mut self, mut new: Config) {
        if !self.dbs.is_empty() || !self.files.is_empty() {
            // Start-only settings keep their running values.
            new.spool_dir = self.config.spool_dir.clone();
            new.connect = self.config.connect.clone();
            new.spool_max_bytes = self.config.spool_max_bytes;
            new.segment_bytes = self.config.segment_bytes;
        }
        let want_db: BTreeMap<String, Option<Vec<String>>> = new
            .sqlite
            .iter()
            .map(|s| (s.path.to_string_lossy().into_owned(), s.tables.clone()))
            .collect();
        let gone: Vec<String> = self
            .dbs
            .keys()
            .filter(|k| !want_db.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(src) = self.dbs.remove(&k) {
                tracing::info!(source = %k, "SQLite source removed: dropping its triggers once the database is quiet");
                self.leaving.insert(k, src.db);
            }
        }
        self.drop_leaving_triggers();
        for (k, tables) in want_db {
            // A source that comes back keeps its triggers.
            self.leaving.remove(&k);
            match self.dbs.get_mut(&k) {
                Some(src) => {
                    src.db.set_tables(tables);
                    src.dirty = true;
                }
                None => {
                    tracing::info!(source = %k, "SQLite source added");
                    self.dbs.insert(
                        k.clone(),
                        DbSource {
                            db: Db::new(k, tables),
                            dirty: true,
                            deleted_upto: 0,
                        },
                    );
                }
            }
        }
        let want_files: BTreeMap<String, Option<KvFormat>> = new
            .json
            .iter()
            .map(|s| (s.path.to_string_lossy().into_owned(), None))
            .chain(
                new.kv
                    .iter()
                    .map(|s| (s.path.to_string_lossy().into_owned(), Some(s.format))),
            )
            .collect();
        self.files.retain(|k, _| want_files.contains_key(k));
        for (k, kv) in want_files {
            let added = !self.files.contains_key(&k);
            let src = self
                .files
                .entry(k.clone())
                .or_insert(FileSource { kv, dirty: true });
            src.kv = kv;
            src.dirty = true;
            if added {
                tracing::info!(source = %k, kind = if kv.is_some() { "kv" } else { "json" }, "source added");
            }
        }
        *self.shared.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
        self.config = new;
        self.update_watches();
        self.waker.wake();
    }
}

/// Keeps an entry within the protocol's limits: a value that is too large or not
/// JSON becomes an `$omitted` marker; an entry whose key cannot be sent is dropped
/// with an error in the log.
fn sanitize(mut e: Entry) -> Option<Entry> {
    let limits = proto::LIMITS;
    let check = |e: &Entry| {
        let mut t = e.clone();
        t.seq = 1;
        t.validate(&limits)
    };
    if check(&e).is_ok() {
        return Some(e);
    }
    for v in [&mut e.old, &mut e.new] {
        if let Some(text) = v {
            let ok = text.len() <= limits.value
                && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
            if !ok {
                tracing::warn!(source = %e.source, key = %e.key, bytes = text.len(), "a value cannot be carried (too large or not JSON); recorded as omitted");
                *v = Some(jsonptr::omitted(text.len()).to_string());
            }
        }
    }
    match check(&e) {
        Ok(()) => Some(e),
        Err(err) => {
            tracing::error!(source = %e.source, "a change cannot be recorded and is dropped: {err}");
            None
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
