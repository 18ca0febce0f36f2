//! weft: the host agent (`weftd`) and its command-line client (`weft`).
//!
//! weftd keeps a catalog of environments (VMs) in SQLite, launches and
//! supervises QEMU or attaches to a QEMU started by someone else, and serves an
//! HTTP/JSON API on a unix socket. The `weft` CLI is a thin client of that API.

pub mod api;
pub mod audit;
pub mod balloon;
pub mod blk;
pub mod catalog;
pub mod catalog_snapshots;
pub mod cgroups;
pub mod compositions;
pub mod config;
pub mod confine;
pub mod daemon;
pub mod dhcp;
pub mod dpa;
pub mod envs;
pub mod error;
pub mod host;
pub mod images;
pub mod launch;
pub mod leftovers;
pub mod model;
pub mod names;
pub mod net;
pub mod overlays;
pub mod placement;
pub mod policies;
pub mod provenance;
pub mod qemu_user;
pub mod retention;
pub mod roles;
pub mod snapshots;
pub mod strict;
pub mod sync;
pub mod testpoints;
#[cfg(test)]
mod testrig;
pub mod weavenet;
pub mod weaves;
