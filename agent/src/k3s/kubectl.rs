//! `kubectl`, as built into the installed `k3s` binary, run with one of the node's own kubeconfigs.
//! One runner serves every question the agent asks the API server: the pods bound to this node
//! ([`crate::pods`]) and whether its Node is Ready ([`super::readiness`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `k3s kubectl` of one installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubectl {
    /// The `k3s` binary, e.g. `<root>/usr/local/bin/k3s`.
    pub k3s: PathBuf,
    /// How long one command may take; it is killed after that.
    pub timeout: Duration,
}

/// What a finished `kubectl` printed, and whether it exited 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// `kubectl` did not finish.
#[derive(Debug, thiserror::Error)]
pub enum KubectlError {
    #[error("no answer within {after:?}")]
    Timeout { after: Duration },
    #[error("cannot run {}: {error}", program.display())]
    Spawn { program: PathBuf, error: std::io::Error },
}

impl Kubectl {
    /// The `k3s` binary K3s' installer puts under `root`, with a 10 s limit per command.
    pub fn under(root: &Path) -> Kubectl {
        Kubectl { k3s: super::paths::under(root, Path::new(super::paths::BINARY)), timeout: Duration::from_secs(10) }
    }

    /// Runs `k3s kubectl --kubeconfig <kubeconfig> <args>`.
    pub async fn run(&self, kubeconfig: &Path, args: &[&str]) -> Result<KubectlOutput, KubectlError> {
        let output = tokio::time::timeout(
            self.timeout,
            tokio::process::Command::new(&self.k3s)
                .arg("kubectl")
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| KubectlError::Timeout { after: self.timeout })?
        .map_err(|error| KubectlError::Spawn { program: self.k3s.clone(), error })?;
        Ok(KubectlOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn runs_k3s_kubectl_with_the_kubeconfig_and_bounds_it() {
        let dir = tempfile::tempdir().unwrap();
        let k3s = dir.path().join("k3s");
        std::fs::write(&k3s, "#!/bin/sh\necho \"$*\"\n[ \"$4\" = slow ] && sleep 5\necho oops >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&k3s, std::fs::Permissions::from_mode(0o755)).unwrap();
        let kubectl = Kubectl { k3s, timeout: Duration::from_millis(500) };
        let out = kubectl.run(Path::new("/kc"), &["get", "pods"]).await.unwrap();
        assert_eq!(
            out,
            KubectlOutput {
                success: false,
                stdout: "kubectl --kubeconfig /kc get pods\n".into(),
                stderr: "oops\n".into()
            }
        );
        let err = kubectl.run(Path::new("/kc"), &["slow"]).await.unwrap_err();
        assert_eq!(err.to_string(), "no answer within 500ms");
        let missing = Kubectl { k3s: dir.path().join("nope"), timeout: Duration::from_secs(1) };
        let err = missing.run(Path::new("/kc"), &[]).await.unwrap_err().to_string();
        assert!(err.starts_with(&format!("cannot run {}/nope: ", dir.path().display())), "{err}");
    }
}
