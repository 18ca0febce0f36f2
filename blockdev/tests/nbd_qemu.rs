//! The NBD client against QEMU 7.2's real NBD servers: `qemu-nbd` and
//! `qemu-storage-daemon`. Every test that starts one is named `qemu_*` (nextest runs
//! those serially); each takes a few seconds at most.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wait_until::Step;

use weft_blockdev::nbd::{
    proto::NBD_REP_FLAG_ERROR, Error, Extent, NbdClient, NBD_STATE_DIRTY, NBD_STATE_HOLE,
    NBD_STATE_ZERO,
};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// A server process, killed when dropped; its stderr is kept for failure messages.
struct Server {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Server {
    fn start(mut cmd: Command, sock: PathBuf, log: PathBuf) -> Server {
        let err = std::fs::File::create(&log).expect("create server log");
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
        let child = cmd
            .spawn()
            .expect("start the nbd server (is QEMU installed?)");
        let mut s = Server { child, sock, log };
        s.wait_ready();
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls for the socket with a deadline; fails with the server's output.
    fn wait_ready(&mut self) {
        let ready =
            wait_until::wait_until("the nbd server to listen", Duration::from_secs(10), || {
                if let Err(e) = std::os::unix::net::UnixStream::connect(&self.sock) {
                    return match self.child.try_wait() {
                        Ok(Some(st)) => Step::Fail(format!("it exited with {st}")),
                        _ => Step::Pending(format!("connect: {e}")),
                    };
                }
                Step::Ready(())
            });
        if let Err(e) = ready {
            panic!("{e}; its output: {}", self.log());
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a qemu tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-nbd` on a unix socket, export name `exp`.
fn qemu_nbd(dir: &Path, image: &Path, format: &str, extra: &[&str]) -> Server {
    let sock = dir.join("nbd.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.arg("--socket")
        .arg(&sock)
        // --shared: qemu-nbd serves one client at a time by default.
        .args(["--export-name", "exp", "--format", format, "--persistent"])
        .args(["--shared", "8"])
        .args(extra)
        .arg(image);
    Server::start(cmd, sock, dir.join("qemu-nbd.log"))
}

/// `qemu-storage-daemon` exporting `node` (set up by `blockdevs`) as `exp`.
fn qsd(dir: &Path, blockdevs: &[String], export_opts: &str) -> Server {
    let sock = dir.join("qsd.sock");
    let mut cmd = Command::new("qemu-storage-daemon");
    for b in blockdevs {
        cmd.arg("--blockdev").arg(b);
    }
    cmd.arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .arg("--export")
        .arg(format!("type=nbd,id=e,name=exp,{export_opts}"));
    Server::start(cmd, sock, dir.join("qsd.log"))
}

/// A byte pattern that differs at every offset and between seeds.
fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = offset + i;
            (x ^ (x >> 8) ^ (x >> 16)).wrapping_mul(31) as u8 ^ seed
        })
        .collect()
}

/// Writes a sparse raw image of `size` bytes with `regions` (offset, len, seed);
/// returns the expected content.
fn sparse_raw(path: &Path, size: u64, regions: &[(u64, usize, u8)]) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    let mut expect = vec![0u8; size as usize];
    for &(off, len, seed) in regions {
        let p = pattern(seed, off, len);
        f.write_all_at(&p, off).expect("write pattern");
        expect[off as usize..off as usize + len].copy_from_slice(&p);
    }
    f.sync_all().expect("sync image");
    expect
}

/// Whether `[start, end)` is entirely covered by extents whose flags satisfy `pred`.
fn covered_by(extents: &[Extent], start: u64, end: u64, pred: impl Fn(u32) -> bool) -> bool {
    let mut pos = start;
    for e in extents {
        if e.end() <= pos || e.offset >= end {
            continue;
        }
        if e.offset > pos || !pred(e.flags) {
            return false;
        }
        pos = e.end();
        if pos >= end {
            return true;
        }
    }
    pos >= end
}

/// Checks the shape every block_status_all result must have.
fn check_tiling(extents: &[Extent], size: u64) {
    let mut pos = 0;
    for (i, e) in extents.iter().enumerate() {
        assert_eq!(e.offset, pos, "extent {i} not contiguous: {extents:?}");
        assert!(e.length > 0);
        if i > 0 {
            assert_ne!(extents[i - 1].flags, e.flags, "unmerged: {extents:?}");
        }
        pos = e.end();
    }
    assert_eq!(pos, size, "extents do not cover the export: {extents:?}");
}

#[tokio::test]
async fn qemu_nbd_reads_patterns_and_holes_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let size = 8 * MIB;
    let regions = [
        (0, 64 * KIB as usize, 1),
        (MIB + 512, 100 * KIB as usize + 17, 2),
        (5 * MIB, 4096, 3),
        (size - 4096, 4096, 4),
    ];
    let expect = sparse_raw(&img, size, &regions);
    let srv = qemu_nbd(dir.path(), &img, "raw", &["--read-only"]);

    let c = NbdClient::connect_unix(&srv.sock, "exp", &["base:allocation"])
        .await
        .unwrap();
    assert_eq!(c.size(), size);
    assert!(c.is_read_only());
    assert!(c.structured_replies());
    assert_eq!(c.contexts().len(), 1);
    assert_eq!(c.contexts()[0].1, "base:allocation");
    assert!(c.max_request() > 0 && c.max_request() <= 32 << 20);
    let min = u64::from(c.block_size().minimum);

    // The whole export in max_request pieces: data and holes byte-exact.
    let mut all = vec![0xeeu8; size as usize];
    c.read_into(0, &mut all).await.unwrap();
    assert!(all == expect, "whole-export read differs");

    // Small reads at pattern edges and inside holes.
    for (off, len) in [
        (MIB, 4096u32),
        (MIB + 512, 4096),
        (2 * MIB, 64 * 1024),
        (5 * MIB - 4096, 3 * 4096),
        (size - 8192, 8192),
    ] {
        let off = off / min * min;
        let got = c.read(off, len).await.unwrap();
        assert!(
            got[..] == expect[off as usize..off as usize + len as usize],
            "read at {off} len {len} differs"
        );
    }

    // base:allocation tells the data regions from the holes.
    let ext = c.block_status_all("base:allocation").await.unwrap();
    check_tiling(&ext, size);
    for &(off, len, _) in &regions {
        assert!(
            covered_by(&ext, off, off + len as u64, |f| f & NBD_STATE_HOLE == 0),
            "data at {off} not reported allocated: {ext:?}"
        );
    }
    for (start, end) in [(2 * MIB, 5 * MIB), (6 * MIB, size - 64 * KIB)] {
        assert!(
            covered_by(&ext, start, end, |f| f == NBD_STATE_HOLE | NBD_STATE_ZERO),
            "hole {start}..{end} not reported: {ext:?}"
        );
    }

    // A ranged query starts at its offset and stays inside the request.
    let part = c
        .block_status(MIB, 2 * MIB as u32, "base:allocation")
        .await
        .unwrap();
    assert_eq!(part[0].offset, MIB);
    assert!(part.last().unwrap().end() <= 3 * MIB);

    // Out of range and misuse are refused locally.
    assert!(matches!(
        c.read(size - 512, 1024).await,
        Err(Error::InvalidRequest { .. })
    ));
    assert!(matches!(
        c.write(0, b"x").await,
        Err(Error::InvalidRequest { .. })
    ));
    assert!(matches!(
        c.block_status(0, 4096, "qemu:dirty-bitmap:b0").await,
        Err(Error::InvalidRequest { .. })
    ));
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn qemu_nbd_64_concurrent_reads_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let size = 4 * MIB;
    let expect = sparse_raw(&img, size, &[(0, size as usize, 9)]);
    let srv = qemu_nbd(dir.path(), &img, "raw", &["--read-only"]);
    let c = NbdClient::connect_unix(&srv.sock, "exp", &[])
        .await
        .unwrap();

    let mut set = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        let c = c.clone();
        // Different sizes and offsets, so replies come back in a mixed order.
        let len = (4096 * (1 + i % 16)) as u32;
        let off = (i * 61_440) % (size - u64::from(len));
        let off = off / 512 * 512;
        set.spawn(async move { (off, c.read(off, len).await) });
    }
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        let (off, data) = r.unwrap();
        let data = data.unwrap();
        assert!(
            data[..] == expect[off as usize..off as usize + data.len()],
            "concurrent read at {off} differs"
        );
        n += 1;
    }
    assert_eq!(n, 64);
}

#[tokio::test]
async fn qemu_nbd_qcow2_allocation_status() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("4M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "write -P 0x33 3M 128k",
        ])
        .arg(&img));
    let srv = qemu_nbd(dir.path(), &img, "qcow2", &["--read-only"]);
    let c = NbdClient::connect_unix(&srv.sock, "exp", &["base:allocation"])
        .await
        .unwrap();
    let ext = c.block_status_all("base:allocation").await.unwrap();
    check_tiling(&ext, 4 * MIB);
    let data: Vec<(u64, u64)> = ext
        .iter()
        .filter(|e| e.flags & NBD_STATE_HOLE == 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(data, vec![(MIB, 64 * KIB), (3 * MIB, 128 * KIB)], "{ext:?}");
    assert_eq!(c.read(MIB, 65536).await.unwrap(), vec![0x5a; 65536]);
    assert_eq!(
        c.read(3 * MIB + 4096, 4096).await.unwrap(),
        vec![0x33; 4096]
    );
    assert_eq!(c.read(2 * MIB, 4096).await.unwrap(), vec![0; 4096]);
}

/// A qcow2 with persistent bitmap `b0` dirtied by qemu-io at two ranges.
fn dirty_qcow2(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("8M"));
    // Data written before the bitmap exists is allocated but not dirty.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 0 512k"])
        .arg(&img));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--enable", "-f", "qcow2"])
        .arg(&img)
        .arg("b0"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -P 0xcd 5M 192k",
        ])
        .arg(&img));
    // QEMU 7.2 refuses to export an enabled bitmap read-only ("incompatible with
    // readonly export"); a backup exports a disabled one, as here.
    run(Command::new("qemu-img")
        .args(["bitmap", "--disable", "-f", "qcow2"])
        .arg(&img)
        .arg("b0"));
    img
}

async fn check_dirty_bitmap(c: &NbdClient) {
    let dirty_ctx = "qemu:dirty-bitmap:b0";
    assert!(c.context_id(dirty_ctx).is_some());
    assert!(c.context_id("base:allocation").is_some());
    let ext = c.block_status_all(dirty_ctx).await.unwrap();
    check_tiling(&ext, 8 * MIB);
    let dirty: Vec<(u64, u64)> = ext
        .iter()
        .filter(|e| e.flags & NBD_STATE_DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(
        dirty,
        vec![(MIB, 64 * KIB), (5 * MIB, 192 * KIB)],
        "{ext:?}"
    );
    assert_eq!(c.read(MIB, 65536).await.unwrap(), vec![0xab; 65536]);
    assert_eq!(
        c.read(5 * MIB, 192 * 1024).await.unwrap(),
        vec![0xcd; 192 * 1024]
    );
    // Allocation is a different context on the same connection.
    let alloc = c.block_status_all("base:allocation").await.unwrap();
    assert!(covered_by(&alloc, 0, 512 * KIB, |f| f & NBD_STATE_HOLE == 0));
}

#[tokio::test]
async fn qemu_storage_daemon_dirty_bitmap_reports_exact_dirty_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let img = dirty_qcow2(dir.path());
    let srv = qsd(
        dir.path(),
        &[
            format!("driver=file,filename={},node-name=file", img.display()),
            "driver=qcow2,file=file,node-name=fmt".into(),
        ],
        "node-name=fmt,bitmaps.0=b0",
    );
    let c = NbdClient::connect_unix(
        &srv.sock,
        "exp",
        &["base:allocation", "qemu:dirty-bitmap:b0"],
    )
    .await
    .unwrap();
    check_dirty_bitmap(&c).await;

    // Another connection asking for a bitmap that is not exported.
    let err = NbdClient::connect_unix(&srv.sock, "exp", &["qemu:dirty-bitmap:nope"])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::ContextNotGranted(n) if n == "qemu:dirty-bitmap:nope"),
        "{err}"
    );
    assert!(err.to_string().contains("qemu:dirty-bitmap:nope"));
}

#[tokio::test]
async fn qemu_nbd_dirty_bitmap_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dirty_qcow2(dir.path());
    let srv = qemu_nbd(
        dir.path(),
        &img,
        "qcow2",
        &["--read-only", "--bitmap", "b0"],
    );
    let c = NbdClient::connect_unix(
        &srv.sock,
        "exp",
        &["base:allocation", "qemu:dirty-bitmap:b0"],
    )
    .await
    .unwrap();
    check_dirty_bitmap(&c).await;

    let err = NbdClient::connect_unix(
        &srv.sock,
        "exp",
        &["base:allocation", "qemu:dirty-bitmap:b1"],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, Error::ContextNotGranted(n) if n == "qemu:dirty-bitmap:b1"),
        "{err}"
    );

    // An export that does not exist: NBD_REP_ERR_UNKNOWN with the server's message.
    let err = NbdClient::connect_unix(&srv.sock, "nosuch", &[])
        .await
        .unwrap_err();
    match &err {
        Error::OptionRefused {
            option,
            code,
            message,
        } => {
            assert_eq!(*option, "NBD_OPT_GO");
            assert_eq!(*code, NBD_REP_FLAG_ERROR | 6);
            assert!(message.contains("nosuch"), "{message}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn qemu_nbd_write_zeroes_and_flush() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("2M"));
    let srv = qemu_nbd(dir.path(), &img, "qcow2", &[]);
    let c = NbdClient::connect_unix(&srv.sock, "exp", &["base:allocation"])
        .await
        .unwrap();
    assert!(!c.is_read_only());
    let data = pattern(7, 65536, 200_000);
    c.write(65536, &data).await.unwrap();
    c.write_zeroes(65536 + 4096, 8192).await.unwrap();
    c.flush().await.unwrap();
    let mut want = data.clone();
    want[4096..4096 + 8192].fill(0);
    assert!(c.read(65536, 200_000).await.unwrap() == want);
    let ext = c.block_status_all("base:allocation").await.unwrap();
    assert!(
        covered_by(&ext, 0, 65536, |f| f & NBD_STATE_HOLE != 0),
        "{ext:?}"
    );
    assert!(covered_by(&ext, 65536, 65536 + 4096, |f| f
        & NBD_STATE_HOLE
        == 0));
    c.disconnect().await.unwrap();
    // What was written is in the image.
    drop(srv);
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
        .arg(&img)
        .arg({
            let raw = dir.path().join("want.raw");
            let mut full = vec![0u8; 2 * MIB as usize];
            full[65536..65536 + want.len()].copy_from_slice(&want);
            std::fs::write(&raw, &full).unwrap();
            raw
        })
        .output()
        .unwrap();
    assert!(out.status.success(), "image content differs after writes");
}

#[tokio::test]
async fn qemu_storage_daemon_killed_mid_request_fails_pending_with_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    // A null device whose every read takes 5 s: requests are surely in flight. (With
    // read-zeroes=on the server answers reads from block status, without waiting.)
    let mut srv = qsd(
        dir.path(),
        &["driver=null-co,node-name=n,size=16777216,read-zeroes=off,latency-ns=5000000000".into()],
        "node-name=n",
    );
    let c = NbdClient::connect_unix(&srv.sock, "exp", &[])
        .await
        .unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..4u64 {
        let c = c.clone();
        set.spawn(async move { c.read(i * 65536, 65536).await });
    }
    wait_until::Wait::new("four reads in flight", Duration::from_secs(10))
        .until_async(|| async { (c.in_flight() == 4).then_some(()) })
        .await
        .unwrap();
    srv.kill();
    // The server's 5 s latency never ends: anything but an error at once is a hang.
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = set.join_next().await {
            let r = r.unwrap().map(|d| d.len());
            assert!(matches!(r, Err(Error::Disconnected)), "{r:?}");
        }
    })
    .await
    .expect("pending requests hung");
    // And the connection stays dead.
    let r = c.read(0, 512).await.map(|d| d.len());
    assert!(matches!(r, Err(Error::Disconnected)), "{r:?}");
}
