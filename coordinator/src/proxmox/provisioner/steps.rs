//! One step of a VM's state machine: clone, configure, start, wait for registration, retire.

use super::*;

impl Provisioner {
    /// Runs one step of `record` and writes what it decided; a failure is recorded, retried while
    /// transient, else the VM is destroyed and replaced.
    pub(super) async fn step_and_record(&self, record: VmRecord) {
        let id = record.id.clone();
        let outcome = self.step(&record).await;
        let result = self.store.write(|tx| {
            // `retire` is the plan's to set; a step never clears it.
            let current = tx.vm(&id)?;
            let retire = current.as_ref().and_then(|c| c.retire.clone());
            match outcome {
                Ok(Outcome::Next(mut next)) => {
                    if next.retire.is_none() {
                        next.retire = retire;
                    }
                    if next.state != record.state {
                        next.state_since_unix_ms = now_unix_ms();
                    }
                    tx.put_vm(&next)?;
                }
                Ok(Outcome::Wait) => {}
                Ok(Outcome::Gone) => {
                    tx.remove_vm(&id)?;
                    if let Some(token) = &record.token_id {
                        tx.remove_token(token)?;
                    }
                }
                Err(e) => {
                    let Some(mut current) = current else { return Ok::<_, StoreError>(()) };
                    let message = e.to_string();
                    let elapsed = now_unix_ms().saturating_sub(current.state_since_unix_ms);
                    let retrying = e.transient() && elapsed < self.settings.retry_for.as_millis() as u64;
                    let on_the_way_out = !current.state.active() || current.retire.is_some();
                    tracing::warn!(record = %id, state = %current.state, error = %message, retrying, "VM step failed");
                    current.last_error = Some(message.clone());
                    if retrying || on_the_way_out {
                        let backoff = self.client.backoff.delay(3);
                        current.not_before_unix_ms = now_unix_ms() + backoff.as_millis() as u64;
                    } else {
                        // Destroy this one and replace it, carrying the reason.
                        let vm = current.vmid.map_or_else(|| format!("record {id}"), |v| format!("VM {v}"));
                        current.retire = Some(format!("failed: {message}"));
                        current.not_before_unix_ms = 0;
                        let replacement = self.new_record(
                            &current.tenant,
                            &current.node_class,
                            Some(format!("replaces {vm} ({}): {message}", current.state)),
                            current.generation + 1,
                        );
                        tx.put_vm(&replacement)?;
                        let mut kept: Vec<Failure> = tx.meta(FAILURES)?.unwrap_or_default();
                        kept.push(Failure {
                            at_unix: now_unix(),
                            tenant: current.tenant.clone(),
                            record: id.clone(),
                            vmid: current.vmid,
                            state: current.state,
                            reason: message.clone(),
                        });
                        let excess = kept.len().saturating_sub(FAILURES_KEPT);
                        kept.drain(..excess);
                        tx.set_meta(FAILURES, &kept)?;
                        tracing::info!(record = %replacement.id, replaces = %id, "replacement VM requested");
                    }
                    tx.put_vm(&current)?;
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::error!(record = %id, error = %e, "cannot record a VM step");
        }
    }

    async fn step(&self, record: &VmRecord) -> Result<Outcome, StepError> {
        let mut next = record.clone();
        if let Some(reason) = &record.retire {
            return self.retire_step(next, reason).await;
        }
        match record.state {
            VmState::Requested => {
                let (node, vmid) = self.choose_node(&next).await?;
                next.vmid = Some(vmid);
                next.pve_node = Some(node);
                next.state = VmState::Cloning;
                Ok(Outcome::Next(Box::new(next)))
            }
            VmState::Cloning => self.clone_step(next).await,
            VmState::Configuring => self.configure_step(next).await,
            VmState::Starting => {
                let (node, vmid) = placed(&next)?;
                // Started already when a previous attempt's answer was lost.
                if self.client.status(&node, vmid).await?.status != "running" {
                    self.client.power(&node, vmid, "start", &[]).await?;
                }
                next.state = VmState::WaitingForRegistration;
                next.last_error = next.last_error.filter(|e| e.starts_with("replaces"));
                Ok(Outcome::Next(Box::new(next)))
            }
            VmState::WaitingForRegistration => {
                if let Some(node) = self.registered_node(&next)? {
                    tracing::info!(record = %next.id, node, vmid = ?next.vmid, "VM registered; seed and token revoked");
                    next.state = VmState::Bound;
                    next.seed_id = None;
                    next.token_secret = None;
                    next.last_error = None;
                    return Ok(Outcome::Next(Box::new(next)));
                }
                let waited = now_unix_ms().saturating_sub(next.state_since_unix_ms);
                if waited > self.settings.registration_timeout.as_millis() as u64 {
                    return Err(StepError::Failed(format!(
                        "did not register within {}",
                        humantime::format_duration(self.settings.registration_timeout)
                    )));
                }
                Ok(Outcome::Wait)
            }
            VmState::Bound => Ok(Outcome::Wait),
            VmState::Draining | VmState::Stopping | VmState::Destroying => {
                let reason = next.retire.clone().unwrap_or_else(|| "removed".into());
                self.retire_step(next, &reason).await
            }
        }
    }

    /// The allowed online node with most free memory, counting as used the memory of VMs already
    /// headed there that PVE does not count yet (not running); and a VMID from `/cluster/nextid`
    /// that none of our VMs on their way holds (PVE sees those only once their clone starts).
    async fn choose_node(&self, record: &VmRecord) -> Result<(String, u32), StepError> {
        let nodes = self.client.nodes().await?;
        let mut promised = self.promised.lock().await;
        let records = self.store.vms()?;
        // Promises whose record has its node recorded (or is gone) are in the records now.
        promised.retain(|id, _| records.get(id).is_some_and(|r| r.pve_node.is_none()));
        let memory_of = |class: &str| self.class(class).map_or(0, |c| c.memory_bytes);
        let mut headed: BTreeMap<&str, u64> = BTreeMap::new();
        for r in records.values() {
            if let (Some(node), VmState::Cloning | VmState::Configuring | VmState::Starting) = (&r.pve_node, r.state) {
                *headed.entry(node.as_str()).or_default() += memory_of(&r.node_class);
            }
        }
        for (node, bytes, _) in promised.values() {
            *headed.entry(node.as_str()).or_default() += bytes;
        }
        let chosen = nodes
            .into_iter()
            .filter(|n| n.status == "online")
            .filter(|n| self.settings.target_nodes.is_empty() || self.settings.target_nodes.contains(&n.node))
            .max_by_key(|n| {
                let used = n.mem + headed.get(n.node.as_str()).copied().unwrap_or(0);
                n.maxmem.saturating_sub(used)
            })
            .map(|n| n.node)
            .ok_or_else(|| {
                StepError::Failed(format!(
                    "no online Proxmox node among {}",
                    if self.settings.target_nodes.is_empty() {
                        "the cluster's".to_string()
                    } else {
                        self.settings.target_nodes.join(", ")
                    }
                ))
            })?;
        let held: HashSet<u32> =
            records.values().filter_map(|r| r.vmid).chain(promised.values().map(|(_, _, vmid)| *vmid)).collect();
        let mut vmid = self.client.next_id().await?;
        while held.contains(&vmid) {
            vmid += 1;
        }
        promised.insert(record.id.clone(), (chosen.clone(), memory_of(&record.node_class), vmid));
        Ok((chosen, vmid))
    }

    async fn clone_step(&self, mut next: VmRecord) -> Result<Outcome, StepError> {
        let (target, vmid) = placed(&next)?;
        let template = self
            .settings
            .templates
            .get(&next.node_class)
            .ok_or_else(|| StepError::Failed(format!("no template for node class {}", next.node_class)))?;
        let existing = self.client.vms().await?.into_iter().find(|v| v.vmid == u64::from(vmid));
        match existing {
            Some(vm) if vm.name == next.vm_name() => {
                // Ours: asked for before (the answer, or this coordinator, was lost). Let it finish.
                if vm.lock == "clone" {
                    if let Some(upid) = next.upid.clone() {
                        self.client.follow(&Upid::parse(&upid)?).await?;
                    } else {
                        return Ok(Outcome::Wait);
                    }
                }
                next.pve_node = Some(vm.node);
                next.upid = None;
                next.state = VmState::Configuring;
                return Ok(Outcome::Next(Box::new(next)));
            }
            Some(vm) => {
                tracing::info!(record = %next.id, vmid, holder = %vm.name, "VMID taken since nextid; choosing another");
                next.vmid = Some(self.client.next_id().await?);
                next.upid = None;
                next.last_error = Some(format!("VMID {vmid} was taken by {:?} before the clone; retried", vm.name));
                return Ok(Outcome::Next(Box::new(next)));
            }
            None if next.upid.is_some() => {
                // The task we followed ended without a VM: it failed; ask again.
                next.upid = None;
                return Ok(Outcome::Next(Box::new(next)));
            }
            None => {}
        }
        let name = next.vm_name();
        let request = CloneRequest {
            template_node: &template.node,
            template_vmid: template.vmid,
            newid: vmid,
            name: &name,
            target: &target,
            full: self.settings.full_clone,
            storage: &self.settings.storage,
        };
        match self.client.clone_vm(&request).await {
            Ok(upid) => {
                // Persist the task before following it, so a restart follows the same one.
                next.upid = Some(upid.text.clone());
                self.store.write(|tx| {
                    if let Some(mut current) = tx.vm(&next.id)? {
                        current.upid = next.upid.clone();
                        tx.put_vm(&current)?;
                    }
                    Ok::<_, StoreError>(())
                })?;
                match self.client.follow(&upid).await {
                    Ok(()) => {
                        next.upid = None;
                        next.state = VmState::Configuring;
                        Ok(Outcome::Next(Box::new(next)))
                    }
                    Err(e) if e.is_vmid_taken() => self.new_vmid(next, vmid, &e).await,
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) if e.is_vmid_taken() => self.new_vmid(next, vmid, &e).await,
            Err(e) => Err(e.into()),
        }
    }

    async fn new_vmid(&self, mut next: VmRecord, vmid: u32, e: &ProxmoxError) -> Result<Outcome, StepError> {
        tracing::info!(record = %next.id, vmid, error = %e, "VMID collision; choosing another");
        next.vmid = Some(self.client.next_id().await?);
        next.upid = None;
        next.last_error = Some(format!("VMID {vmid} collided ({}); retried with another", e.text()));
        Ok(Outcome::Next(Box::new(next)))
    }

    async fn configure_step(&self, mut next: VmRecord) -> Result<Outcome, StepError> {
        let (node, vmid) = placed(&next)?;
        let class = self
            .class(&next.node_class)
            .cloned()
            .ok_or_else(|| StepError::Failed(format!("unknown node class {}", next.node_class)))?;
        if next.token_id.is_none() || next.seed_id.is_none() {
            // Token and seed exist before the VM can ask for them; both are bound to this VM.
            let minted = MintedToken::generate();
            let identity = next.identity().ok_or_else(|| StepError::Failed("no VMID".into()))?;
            let now = now_unix();
            let ttl = self.settings.registration_timeout + self.settings.task_timeout;
            let token = TokenRecord {
                id: minted.id.clone(),
                secret_sha256: sha256_hex(&minted.secret),
                pool: Pool::Dedicated { tenant: next.tenant.clone() },
                description: format!("Proxmox VM {vmid} ({}) for tenant {}", next.vm_name(), next.tenant),
                node_class: Some(next.node_class.clone()),
                created_at_unix: now,
                expires_at_unix: now + ttl.as_secs() as i64,
                state: TokenState::Active,
                reenroll: None,
                provider: Some(identity),
            };
            next.token_id = Some(minted.id.clone());
            next.token_secret = Some(minted.text());
            next.seed_id = Some(crate::bootstrap::random_secret());
            self.store.write(|tx| {
                tx.put_token(&token)?;
                tx.put_vm(&next)?;
                Ok::<_, StoreError>(())
            })?;
        }
        let seed = format!("{}/seed/{}/", self.seed_base(), next.seed_id.as_deref().unwrap_or_default());
        let mut params = vec![
            ("cores", class.cpu_millis.div_ceil(1000).max(1).to_string()),
            ("memory", (class.memory_bytes >> 20).max(16).to_string()),
            ("tags", next.tags(&self.settings.tags)),
            ("smbios1", crate::proxmox::userdata::smbios1(&next.smbios_uuid, &seed)),
            ("onboot", "1".to_string()),
        ];
        if !self.settings.bridge.is_empty() {
            params.push(("net0", format!("virtio,bridge={}", self.settings.bridge)));
        }
        self.client.configure(&node, vmid, &params).await?;
        let disk =
            self.settings.templates.get(&next.node_class).map(|t| t.disk.clone()).unwrap_or_else(|| "scsi0".into());
        let gib = class.disk_bytes >> 30;
        if gib > 0 {
            self.client.resize(&node, vmid, &disk, &format!("{gib}G")).await?;
        }
        next.state = VmState::Starting;
        Ok(Outcome::Next(Box::new(next)))
    }

    /// The node this VM's agent enrolled as: with this VM's token and identity.
    fn registered_node(&self, record: &VmRecord) -> Result<Option<String>, StoreError> {
        let (Some(token), Some(identity)) = (&record.token_id, record.identity()) else { return Ok(None) };
        Ok(self.store.nodes()?.into_values().find(|n| &n.token_id == token && n.provider == identity).map(|n| n.name))
    }

    /// Drain, stop, destroy, forget: each call does the next of these.
    async fn retire_step(&self, mut next: VmRecord, reason: &str) -> Result<Outcome, StepError> {
        match next.state {
            VmState::Bound | VmState::Draining => {
                let node = self.registered_node(&next)?;
                if let (Some(node), Some(tenants)) = (node, self.tenants.get()) {
                    match tenants.drain(&node).await {
                        Ok(_) | Err(crate::tenants::TenantsError::NoNode(_)) => {}
                        Err(e) => return Err(StepError::Failed(format!("cannot drain node {node}: {e}"))),
                    }
                }
                next.state = VmState::Stopping;
                Ok(Outcome::Next(Box::new(next)))
            }
            VmState::Cloning if next.upid.is_some() => {
                // Let the clone finish, so that the VM can be destroyed (it is locked until then).
                if let Some(upid) = &next.upid {
                    let _ = self.client.follow(&Upid::parse(upid)?).await;
                }
                next.upid = None;
                next.state = VmState::Stopping;
                Ok(Outcome::Next(Box::new(next)))
            }
            VmState::Requested => {
                self.forget(&next).await?;
                Ok(Outcome::Gone)
            }
            VmState::Cloning
            | VmState::Configuring
            | VmState::Starting
            | VmState::WaitingForRegistration
            | VmState::Stopping => {
                if let Some((node, vmid)) = self.vm_of(&next).await? {
                    let status = self.client.status(&node, vmid).await?;
                    if status.lock == "clone" {
                        return Ok(Outcome::Wait);
                    }
                    if status.status == "running" {
                        let timeout = self.settings.shutdown_timeout.as_secs().max(1);
                        let clean =
                            self.client.power(&node, vmid, "shutdown", &[("timeout", timeout.to_string())]).await;
                        if let Err(e) = clean {
                            tracing::info!(record = %next.id, vmid, error = %e, "clean shutdown failed; stopping");
                            self.client.power(&node, vmid, "stop", &[]).await?;
                        }
                    }
                }
                next.state = VmState::Destroying;
                tracing::info!(record = %next.id, reason, "VM stopped");
                Ok(Outcome::Next(Box::new(next)))
            }
            VmState::Destroying => {
                if let Some((node, vmid)) = self.vm_of(&next).await? {
                    let status = self.client.status(&node, vmid).await?;
                    if status.status == "running" {
                        self.client.power(&node, vmid, "stop", &[]).await?;
                    }
                    match self.client.destroy(&node, vmid).await {
                        Ok(()) => {}
                        Err(e) if e.is_missing() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                self.forget(&next).await?;
                tracing::info!(record = %next.id, tenant = %next.tenant, vmid = ?next.vmid, reason, "VM destroyed; its token, seed, node and record removed");
                Ok(Outcome::Gone)
            }
        }
    }

    /// Where the VM of `record` is, if it exists and is ours.
    async fn vm_of(&self, record: &VmRecord) -> Result<Option<(String, u32)>, StepError> {
        let Some(vmid) = record.vmid else { return Ok(None) };
        let found = self.client.vms().await?.into_iter().find(|v| v.vmid == u64::from(vmid));
        Ok(found.filter(|v| v.name == record.vm_name()).map(|v| (v.node, vmid)))
    }

    /// Removes the node this VM became (certificate revoked, shares moved, record gone).
    async fn forget(&self, record: &VmRecord) -> Result<(), StepError> {
        if let (Some(node), Some(tenants)) = (self.registered_node(record)?, self.tenants.get()) {
            match tenants.delete_node(&node).await {
                Ok(_) | Err(crate::tenants::TenantsError::NoNode(_)) => {}
                Err(e) => return Err(StepError::Failed(format!("cannot delete node {node}: {e}"))),
            }
        }
        Ok(())
    }
}

fn placed(record: &VmRecord) -> Result<(String, u32), StepError> {
    match (&record.pve_node, record.vmid) {
        (Some(node), Some(vmid)) => Ok((node.clone(), vmid)),
        _ => Err(StepError::Failed(format!("record {} has no Proxmox node or VMID", record.id))),
    }
}
