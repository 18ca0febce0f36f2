//! After weftd restarts: QEMUs still running are re-attached, dead ones recorded as stopped; attaching sockets checked.

use super::*;

impl Manager {
    /// Brings the live side in step with the catalog after weftd starts:
    /// environments whose QEMU still runs are re-attached through their QMP
    /// sockets, dead ones are marked stopped. Runs before the API is served.
    pub async fn recover(self: &Arc<Self>) -> Result<(), ApiError> {
        for env in self.catalog.environments().await? {
            if env.state == EnvState::Stopped {
                // A vsock device left by a weftd that died before ending it.
                if env.kind == EnvKind::Managed {
                    self.release_hooks(&env.name).await;
                    self.settle_overlays(&env.name, None).await;
                }
                continue;
            }
            let (detail, result) = match self.reattach(&env).await {
                Recovered::Reattached => {
                    if env.kind == EnvKind::Managed {
                        for hook in self.hooks() {
                            hook.reattach(&env.name).await;
                        }
                    }
                    ("re-attached".to_string(), "ok")
                }
                Recovered::Stopped(reason) => {
                    if env.kind == EnvKind::Managed {
                        self.release_hooks(&env.name).await;
                    }
                    self.catalog
                        .set_state(&env.name, EnvState::Stopped, None, Some(&reason))
                        .await?;
                    (reason, "marked stopped")
                }
                Recovered::Unreachable(reason) => {
                    warn!(env = %env.name, %reason, "QEMU runs but does not answer on QMP");
                    // Its guest still runs: its DPA may still stream.
                    if env.kind == EnvKind::Managed {
                        for hook in self.hooks() {
                            hook.reattach(&env.name).await;
                        }
                    }
                    (reason, "unreachable")
                }
            };
            // Overlays a weave from now was switching to when weftd stopped: settled
            // against what QEMU runs on (nothing to ask while QEMU may run unanswering).
            if env.kind == EnvKind::Managed && result != "unreachable" {
                let qmp = self.runtime_qmp(&env.name);
                self.settle_overlays(&env.name, qmp.as_ref()).await;
            }
            info!(env = %env.name, %detail, result, "recovered");
            self.catalog
                .audit(
                    "weftd",
                    "env.recover",
                    Some(&env.name),
                    Some(&detail),
                    result,
                )
                .await?;
        }
        Ok(())
    }

    /// Settles `name`'s pending overlays ([`crate::overlays::settle`]); what it did is
    /// audited, a failure logged and audited (recovery goes on).
    pub(super) async fn settle_overlays(&self, name: &str, qmp: Option<&Qmp>) {
        let (detail, result) = match crate::overlays::settle(&self.catalog, name, qmp).await {
            Ok(done) if done.is_empty() => return,
            Ok(done) => (done.join("; "), "ok"),
            Err(e) => {
                warn!(env = %name, error = %e.one_line(), "cannot settle the environment's overlays");
                (e.one_line(), "failed")
            }
        };
        let _ = self
            .catalog
            .audit("weftd", "env.overlays", Some(name), Some(&detail), result)
            .await;
    }

    pub(super) async fn reattach(self: &Arc<Self>, env: &Environment) -> Recovered {
        let live = match env.kind {
            EnvKind::Managed => match self.orphan(env) {
                None if env.state == EnvState::Starting => {
                    return Recovered::Stopped("weftd stopped while QEMU was starting".into())
                }
                None => {
                    return Recovered::Stopped("QEMU exited while weftd was not running".into())
                }
                Some(qemu) if env.state == EnvState::Starting => {
                    // Nobody was told this launch succeeded: undo it.
                    let pid = qemu.pid();
                    let gone = lifecycle::kill_qemu(&qemu, Duration::from_secs(5)).await;
                    let _ = std::fs::remove_file(&env.qmp_socket);
                    let _ = std::fs::remove_file(self.pid_file(&env.name));
                    return Recovered::Stopped(format!(
                        "weftd stopped while QEMU was starting; QEMU pid {pid} was killed ({gone})"
                    ));
                }
                Some(qemu) => Some(qemu.pid()),
            },
            EnvKind::Attached => None,
        };
        let connected = match env.kind {
            // An attached socket is checked again, as at attach.
            EnvKind::Attached => connect_attached(&self.config, &env.qmp_socket)
                .await
                .map_err(|e| e.one_line()),
            EnvKind::Managed => Qmp::connect_timeout(&env.qmp_socket, Duration::from_secs(5))
                .await
                .map_err(|e| e.to_string()),
        };
        let qmp = match connected {
            Ok(qmp) => qmp,
            Err(e) => {
                let reason = format!(
                    "QMP socket {} did not answer after restart: {e}",
                    env.qmp_socket.display()
                );
                return match live {
                    Some(pid) => Recovered::Unreachable(format!(
                        "{reason}; QEMU pid {pid} still runs (`weft env stop {}` ends it)",
                        env.name
                    )),
                    None => Recovered::Stopped(reason),
                };
            }
        };
        if let Err(e) = self
            .catalog
            .set_state(&env.name, EnvState::Running, live, None)
            .await
        {
            return Recovered::Unreachable(format!("cannot record the re-attach: {e}"));
        }
        self.install_runtime(&env.name, qmp, None, live);
        Recovered::Reattached
    }

    /// Refuses QMP sockets weftd must not attach to: relative paths, sockets of the
    /// environments weftd launches, and sockets another environment already uses.
    /// The real path of the QMP socket an attach names: a socket outside weftd's own
    /// directories (see [`crate::confine::attach_socket`]) no environment uses yet.
    pub(super) async fn check_attachable(&self, socket: &Path) -> Result<PathBuf, ApiError> {
        let (_, real) = crate::confine::attach_socket(&self.config, socket)?;
        check_socket_path(&real)?;
        if let Some(other) = self
            .catalog
            .environments()
            .await?
            .into_iter()
            .find(|e| e.qmp_socket == real || e.qmp_socket == socket)
        {
            return Err(ApiError::Conflict(format!(
                "environment {:?} already uses the QMP socket {}",
                other.name,
                socket.display()
            )));
        }
        Ok(real)
    }

    /// Lets every QEMU launched by this weftd outlive it (graceful shutdown).
    pub fn detach_all(&self) {
        for (name, runtime) in self.lock_runtimes().drain() {
            runtime.monitor.abort();
            if let Some(process) = runtime.process {
                let pid = process.detach();
                info!(env = %name, pid, "leaving QEMU running");
            }
        }
    }
}

pub(super) async fn connect_attached(config: &Config, socket: &Path) -> Result<Qmp, ApiError> {
    // Connected through the descriptor of the socket that was checked, so a name
    // swapped after the check cannot redirect the connection.
    let (fd, _) = crate::confine::attach_socket(config, socket)?;
    let via = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    Qmp::connect_timeout(&via, Duration::from_secs(5))
        .await
        .map_err(|e| {
            ApiError::BadRequest(format!(
                "{} does not answer as a QMP socket: {e}",
                socket.display()
            ))
        })
}
