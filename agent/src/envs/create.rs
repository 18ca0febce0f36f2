//! Creating environments (managed from a disk list, attached to a QMP socket) and recording weaves.

use super::*;

impl Manager {
    /// Creates an environment (and launches it unless asked not to).
    pub async fn create(self: &Arc<Self>, req: CreateEnvironment) -> Result<Environment, ApiError> {
        let (CreateEnvironment::Managed { name, .. } | CreateEnvironment::Attached { name, .. }) =
            &req;
        check_name(name)?;
        let _hold = self.reserve(name).await?;
        let _op = self.lock_env(name).await;
        match req {
            CreateEnvironment::Managed {
                name,
                disks,
                memory_mib,
                cpus,
                accel,
                kernel,
                initrd,
                append,
                nics,
                no_start,
            } => {
                check_name(&name)?;
                if self.catalog.environment(&name).await?.is_some() {
                    return Err(ApiError::Duplicate(name));
                }
                // Images come from image_dirs; the canonical path is what is recorded.
                let images = crate::confine::ImageDirs::new(&self.config);
                let disks = disks
                    .into_iter()
                    .map(|mut d| {
                        d.path = images.resolve("disk", &d.path)?;
                        if let Some(b) = &d.backing {
                            d.backing = Some(images.resolve("disk backing", b)?);
                        }
                        Ok(d)
                    })
                    .collect::<Result<Vec<_>, crate::confine::ConfineError>>()?;
                let kernel = kernel.map(|k| images.resolve("kernel", &k)).transpose()?;
                let initrd = initrd.map(|i| images.resolve("initrd", &i)).transpose()?;
                let mut config = vm_config(disks, memory_mib, cpus, kernel, initrd, append)?;
                config.nics = nics;
                config
                    .validate()
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                config.accel = accel.unwrap_or(self.config.accel);
                if config.accel == Accel::Kvm {
                    launch::kvm_probe().map_err(|reason| {
                        ApiError::BadRequest(format!(
                            "--accel kvm: KVM is not usable on this host: {reason}; use --accel tcg or auto"
                        ))
                    })?;
                }
                let socket = self.qmp_socket_path(&name);
                check_socket_path(&socket)?;
                self.catalog
                    .insert_environment(&NewEnvironment {
                        name: &name,
                        kind: EnvKind::Managed,
                        config: Some(&config),
                        qmp_socket: &socket,
                        state: if no_start {
                            EnvState::Stopped
                        } else {
                            EnvState::Starting
                        },
                        pid: None,
                    })
                    .await?;
                if !no_start {
                    if let Err(e) = self.launch(&name, &config, &socket).await {
                        // Nothing half-created: the row and the files go.
                        if let Err(de) = self.catalog.delete_environment(&name).await {
                            warn!(env = %name, error = %de, "could not remove the row of a failed create");
                        }
                        remove_dir_quietly(&self.env_dir(&name));
                        return Err(e);
                    }
                }
                Ok(self.show(&name).await?.0)
            }
            CreateEnvironment::Attached { name, qmp_socket } => {
                check_name(&name)?;
                if self.catalog.environment(&name).await?.is_some() {
                    return Err(ApiError::Duplicate(name));
                }
                let qmp_socket = self.check_attachable(&qmp_socket).await?;
                let qmp = recovery::connect_attached(&self.config, &qmp_socket).await?;
                self.catalog
                    .insert_environment(&NewEnvironment {
                        name: &name,
                        kind: EnvKind::Attached,
                        config: None,
                        qmp_socket: &qmp_socket,
                        state: EnvState::Running,
                        pid: None,
                    })
                    .await?;
                self.install_runtime(&name, qmp, None, None);
                Ok(self.show(&name).await?.0)
            }
        }
    }

    /// Records a weave and its managed environment, stopped, with a complete VM
    /// configuration, in one transaction.
    pub(crate) async fn insert_stopped_weave(
        &self,
        weave: &weft_api::weave::Weave,
        config: &VmConfig,
    ) -> Result<(), ApiError> {
        let name = weave.name.as_str();
        let _op = self.lock_env(name).await;
        config
            .validate()
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let socket = self.qmp_socket_path(name);
        check_socket_path(&socket)?;
        self.catalog
            .insert_weave(
                weave,
                &NewEnvironment {
                    name,
                    kind: EnvKind::Managed,
                    config: Some(config),
                    qmp_socket: &socket,
                    state: EnvState::Stopped,
                    pid: None,
                },
            )
            .await?;
        Ok(())
    }
}
