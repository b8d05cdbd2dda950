//! Realisation of tenants on the host K3s cluster.
//!
//! Each tenant becomes, on the host cluster: a namespace `hx-<tenant>`, labels and taints on the
//! nodes that hold it, and a K3s `HelmChart` in `kube-system` that installs the pinned `vcluster`
//! chart into that namespace with values pinning the control plane and the synced workloads to the
//! tenant's nodes and sizing its quota from the plan.
//!
//! - [`render`]: the pure half. Functions from a tenant and [`render::RenderSettings`] to those
//!   objects (and to YAML files for the `manifests` mode). No I/O, no clock; everything applied to
//!   the cluster or written to disk comes from here, so the snapshot tests show it exactly.
//! - [`helmchart`]: the K3s `HelmChart` custom resource type.
//! - [`reconcile`]: the effects: applies those objects with server-side apply, or writes them as
//!   manifests.
//! - [`access`]: where the credentials come from, down to minting them through a `server` node.
//! - [`pod_watch`]: follows the cluster's Pods and Nodes, which say who owns each pod IP.

pub mod access;
pub mod helmchart;
pub mod pod_watch;
pub mod reconcile;
pub mod render;
