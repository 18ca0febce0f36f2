//! Types exchanged over the HTTP API: they live in the `weft-api` crate, which the
//! CLI shares; this module re-exports them under the paths weftd's modules use.

pub use weft_api::audit::AuditEntry;
pub use weft_api::env::{
    CreateEnvironment, DiskRequest, EnvFiles, EnvKind, EnvState, Environment, Status,
};
pub use weft_api::job::{Job, JobState};
pub use weft_api::net::{
    Egress, EgressRequest, ExposeRequest, GuestPlan, HostPort, NetSetup, UnexposeRequest,
};
pub use weft_api::snapshot::{
    CreateSnapshot, PruneRequest, RestoreRequest, Snapshot, SnapshotKind, SnapshotState,
};
pub use weft_api::ErrorBody;
