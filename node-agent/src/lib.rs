//! The grid node agent: the only service on a node besides the vmm processes it starts.
//!
//! One path for a workload: deployment (signed JSON) -> [`deployment`] verify -> [`state`]
//! (desired state written before anything acts) -> [`engine`] reconcile -> [`supervisor`]
//! (one vmm process per VM, in its own session) -> vmm, whose output the API serves from
//! its [`console`] log. Around it: the node's [`identity`]
//! and [`capacity`], registration through a [`registrar::Registrar`] (an embedded one by
//! default), the HTTP [`api`] and the CLI client that talks to it. The node's [`network`]
//! gives VMs their interfaces (a NAT bridge, private networks over WireGuard, port forwards).

pub mod api;
pub mod auth;
pub mod canonical;
pub mod capacity;
pub mod client;
pub mod config;
pub mod console;
pub mod deployment;
pub mod engine;
pub mod hostmem;
pub mod identity;
pub mod init;
pub mod metrics;
pub mod network;
pub mod registrar;
pub mod routes;
pub mod state;
pub mod supervisor;
pub mod uptime;
pub mod usage;
pub mod vmspec;
