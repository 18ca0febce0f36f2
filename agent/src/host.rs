//! The host's side effects as weftd's logic reaches them: built once, by the daemon
//! ([`Host::kernel`]) or by a test (recording doubles), and handed down. No module
//! builds its own kernel handle.
//!
//! It carries
//! - the network: netlink and nftables through `weft_netns::NetOps` (double:
//!   `weft_netns::Recorder`);
//! - the weaves' cgroups through [`Cgroups`] (double: [`crate::cgroups::Recorder`]);
//! - the weaves' DHCP servers through [`Dhcp`] (real: [`crate::dhcp::Threads`];
//!   double: [`crate::dhcp::Recorder`]);
//! - the launch of environments' and weaves' QEMU through [`Processes`] (real:
//!   [`Children`]; double: `FakeProcesses` in unit tests, which records each launch's
//!   placement and answers with a fake QEMU or a failure).
//!
//! Not behind it (nothing root-free needs them): the qemu-storage-daemon helpers of
//! offline snapshots and overlay creation, the weft-blk and vsock helpers (launch
//! hooks the daemon registers) and the `chown` to `qemu_user` (off by default).

use std::sync::Arc;

use futures::future::BoxFuture;
use weft_netns::{Kernel, NetOps};
use weft_qmp::launch::{LaunchPaths, SpawnOptions, VmConfig};
use weft_qmp::process::QemuProcess;
use weft_qmp::Qmp;

use crate::catalog::Catalog;
use crate::cgroups::Cgroups;
use crate::dhcp::Dhcp;
use crate::net::Net;

/// The host weftd changes.
#[derive(Clone)]
pub struct Host {
    net: Arc<dyn NetOps>,
    cgroups: Arc<dyn Cgroups>,
    dhcp: Arc<dyn Dhcp>,
    processes: Arc<dyn Processes>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

impl Host {
    /// The real host: the kernel's netlink and nftables, `/sys/fs/cgroup`.
    pub fn kernel() -> Host {
        Host {
            net: Arc::new(Kernel::new()),
            cgroups: Arc::new(crate::cgroups::Kernel),
            dhcp: Arc::new(crate::dhcp::Threads::default()),
            processes: Arc::new(Children),
        }
    }

    /// A host whose network, cgroups, DHCP servers and processes are these (test
    /// doubles in unit tests).
    pub fn new(
        net: Arc<dyn NetOps>,
        cgroups: Arc<dyn Cgroups>,
        dhcp: Arc<dyn Dhcp>,
        processes: Arc<dyn Processes>,
    ) -> Host {
        Host {
            net,
            cgroups,
            dhcp,
            processes,
        }
    }

    /// The `net` resource over `catalog`, on this host's network.
    pub fn net(&self, catalog: &Catalog) -> Net {
        Net::with_ops(catalog, self.net.clone())
    }

    /// The weaves' cgroups.
    pub fn cgroups(&self) -> &Arc<dyn Cgroups> {
        &self.cgroups
    }

    /// The weaves' DHCP servers.
    pub fn dhcp(&self) -> &Arc<dyn Dhcp> {
        &self.dhcp
    }

    /// How QEMU is launched.
    pub fn processes(&self) -> &Arc<dyn Processes> {
        &self.processes
    }
}

/// A QEMU that [`Processes::spawn_qemu`] started and that answers on QMP.
#[derive(Debug)]
pub struct Launched {
    /// Its QMP connection, negotiated.
    pub qmp: Qmp,
    /// Its process, supervised (dropping it kills QEMU); none for a stand-in that is
    /// not a child of weftd (then its end is noticed by its QMP connection closing).
    pub process: Option<QemuProcess>,
}

/// Starting QEMU processes.
pub trait Processes: Send + Sync + std::fmt::Debug {
    /// Starts QEMU for `config` with `paths` and `opts` (namespace, cgroups, user) and
    /// waits until its QMP socket has negotiated; on failure nothing of it is left.
    fn spawn_qemu<'a>(
        &'a self,
        config: &'a VmConfig,
        paths: &'a LaunchPaths,
        opts: &'a SpawnOptions,
    ) -> BoxFuture<'a, Result<Launched, weft_qmp::Error>>;
}

/// Real QEMU processes, children of weftd ([`weft_qmp::process::spawn`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Children;

impl Processes for Children {
    fn spawn_qemu<'a>(
        &'a self,
        config: &'a VmConfig,
        paths: &'a LaunchPaths,
        opts: &'a SpawnOptions,
    ) -> BoxFuture<'a, Result<Launched, weft_qmp::Error>> {
        Box::pin(async move {
            let process = weft_qmp::process::spawn(config, paths, opts).await?;
            Ok(Launched {
                qmp: process.qmp().clone(),
                process: Some(process),
            })
        })
    }
}

#[cfg(test)]
pub(crate) mod doubles {
    //! The host of unit tests: recording doubles for the network and cgroups, and
    //! QEMU launches answered by `weft_qmp::fake::FakeQemu` (or failed), so weftd's
    //! logic runs without root, namespaces, cgroups or QEMU.

    use std::sync::{Arc, Mutex, MutexGuard};

    use weft_qmp::fake::FakeQemu;
    use weft_qmp::launch::{LaunchPaths, SpawnOptions, VmConfig};

    use super::{Host, Launched, Processes};

    /// What one launch was asked for.
    #[derive(Debug, Clone)]
    pub(crate) struct Launch {
        pub(crate) paths: LaunchPaths,
        pub(crate) opts: SpawnOptions,
        pub(crate) config: VmConfig,
    }

    #[derive(Debug, Default)]
    struct State {
        launches: Vec<Launch>,
        qemu: Option<Arc<FakeQemu>>,
        failure: Option<String>,
    }

    /// QEMU launches in a unit test: each is recorded; it then fails (with the set
    /// failure, or because no fake QEMU was given) or is answered by the fake QEMU.
    #[derive(Debug, Default)]
    pub(crate) struct FakeProcesses {
        state: Mutex<State>,
    }

    impl FakeProcesses {
        fn lock(&self) -> MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Launches from now on connect to `qemu`.
        pub(crate) fn serve(&self, qemu: Arc<FakeQemu>) {
            let mut st = self.lock();
            st.qemu = Some(qemu);
            st.failure = None;
        }

        /// Launches from now on fail as a binary that cannot start, with `why`.
        pub(crate) fn fail(&self, why: &str) {
            self.lock().failure = Some(why.to_string());
        }

        /// Every launch so far.
        pub(crate) fn launches(&self) -> Vec<Launch> {
            self.lock().launches.clone()
        }
    }

    impl Processes for FakeProcesses {
        fn spawn_qemu<'a>(
            &'a self,
            config: &'a VmConfig,
            paths: &'a LaunchPaths,
            opts: &'a SpawnOptions,
        ) -> futures::future::BoxFuture<'a, Result<Launched, weft_qmp::Error>> {
            Box::pin(async move {
                let (qemu, failure) = {
                    let mut st = self.lock();
                    st.launches.push(Launch {
                        paths: paths.clone(),
                        opts: opts.clone(),
                        config: config.clone(),
                    });
                    (st.qemu.clone(), st.failure.clone())
                };
                let spawn_error = |why: String| weft_qmp::Error::Spawn {
                    binary: opts.binary.clone(),
                    source: std::io::Error::other(why),
                };
                match (qemu, failure) {
                    (_, Some(why)) => Err(spawn_error(why)),
                    (None, None) => Err(spawn_error("no fake QEMU to launch".into())),
                    (Some(qemu), None) => Ok(Launched {
                        qmp: weft_qmp::Qmp::connect(qemu.path()).await?,
                        process: None,
                    }),
                }
            })
        }
    }

    /// The doubles of one test and the host made of them.
    #[derive(Debug, Clone)]
    pub(crate) struct Doubles {
        pub(crate) net: Arc<weft_netns::Recorder>,
        pub(crate) cgroups: Arc<crate::cgroups::Recorder>,
        pub(crate) dhcp: Arc<crate::dhcp::Recorder>,
        pub(crate) processes: Arc<FakeProcesses>,
    }

    impl Doubles {
        /// An empty host: no namespaces, links, tables, groups or DHCP servers;
        /// launches fail.
        pub(crate) fn new() -> Doubles {
            Doubles {
                net: Arc::new(weft_netns::Recorder::new()),
                cgroups: Arc::new(crate::cgroups::Recorder::new()),
                dhcp: Arc::new(crate::dhcp::Recorder::new()),
                processes: Arc::new(FakeProcesses::default()),
            }
        }

        /// The host weftd's logic is given.
        pub(crate) fn host(&self) -> Host {
            Host::new(
                self.net.clone(),
                self.cgroups.clone(),
                self.dhcp.clone(),
                self.processes.clone(),
            )
        }
    }
}
