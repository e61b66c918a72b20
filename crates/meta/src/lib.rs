//! The metadata service: owns the namespace, the file → slice maps and the chunk-server
//! registry, and answers clients and chunk servers over QUIC.
//!
//! Every mutating request is one SQL transaction on a single writer connection, so
//! operations are atomic and serialized; reads use a separate connection pool.

mod acl;
#[cfg(test)]
mod commit_tests;
mod data;
mod error;
mod fsck;
mod group_commit;
mod leases;
#[cfg(test)]
mod leases_tests;
mod locks;
mod metrics;
mod namespace;
mod opens;
mod rebalance;
mod reconcile;
mod registry;
mod repair;
mod service;
mod solo;
mod store;

pub use error::{MetaError, Result};
pub use service::{MetaConfig, MetaService, RunError, run};
pub use store::Store;
