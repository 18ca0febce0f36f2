//! The disk spec: what one weft-blk process serves (a JSON file weftd writes).
//!
//! ```json
//! {
//!   "version": 1,
//!   "store": "/var/lib/weft/store",
//!   "key_file": null,
//!   "layers": [
//!     { "index": "env-db-disk-vda-12" },
//!     { "index": "env-db-disk-vda-15", "slots": [[0, 1024]] }
//!   ],
//!   "write_layer": "/var/lib/weft/weaves/w1/vda.cow",
//!   "trace": "/var/lib/weft/weaves/w1/vda.trace",
//!   "assembly": "/var/lib/weft/weaves/w1/vda.assembly",
//!   "id": "weft-w1-vda"
//! }
//! ```
//! Layers are bottom first. Without `write_layer` the disk is read-only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::backend::QueueConfig;
use super::disk::LayeredDisk;
use super::trace::Trace;
use crate::cow::WriteLayer;
use crate::layers::{self, ChunkCache, ComposedImage, LayerSpec};
use crate::store::ChunkStore;

/// Version of the spec format this build reads.
pub const SPEC_VERSION: u32 = 1;
/// Largest spec file accepted.
pub const MAX_SPEC_BYTES: u64 = 16 << 20;

fn default_cache_mib() -> u64 {
    64
}
fn default_trace_mib() -> u64 {
    64
}
fn default_queues() -> usize {
    2
}
fn default_queue_size() -> usize {
    256
}

/// One served disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Format version ([`SPEC_VERSION`]).
    pub version: u32,
    /// Chunk store root.
    pub store: PathBuf,
    /// Key file of an encrypted store.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Layers, bottom first.
    pub layers: Vec<LayerSpec>,
    /// Directory of the private write layer (absent: read-only disk).
    #[serde(default)]
    pub write_layer: Option<PathBuf>,
    /// File of the read trace (absent: reads are not recorded).
    #[serde(default)]
    pub trace: Option<PathBuf>,
    /// File where the chunks read are kept decompressed and verified, at their disk
    /// offsets, so that a second read of them is a plain file read (absent: every
    /// read that misses the chunk cache goes to the store). Emptied at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assembly: Option<PathBuf>,
    /// Size limit of the trace in MiB.
    #[serde(default = "default_trace_mib")]
    pub trace_limit_mib: u64,
    /// Decompressed-chunk cache in MiB.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u64,
    /// Device id for GET_ID (the guest sees it as the disk's serial).
    #[serde(default)]
    pub id: String,
    /// Request queues.
    #[serde(default = "default_queues")]
    pub queues: usize,
    /// Largest queue size.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
}

/// Why a disk cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec file cannot be read or parsed.
    #[error("disk spec {path}: {reason}")]
    Spec {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The store cannot be opened or an index read.
    #[error("disk spec: {0}")]
    Store(#[from] crate::store::Error),
    /// The layers do not compose.
    #[error("disk spec: {0}")]
    Compose(#[from] layers::ComposeError),
    /// The write layer cannot be opened.
    #[error("disk spec: {0}")]
    WriteLayer(#[from] crate::cow::Error),
    /// The assembly file cannot be created.
    #[error("disk spec: assembly {path}: {source}")]
    Assembly {
        /// The assembly file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The trace file cannot be opened.
    #[error("disk spec: trace {path}: {source}")]
    Trace {
        /// The trace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl DiskSpec {
    /// Reads and checks a spec file.
    pub fn load(path: &Path) -> Result<DiskSpec, SpecError> {
        let bad = |reason: String| SpecError::Spec {
            path: path.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if meta.len() > MAX_SPEC_BYTES {
            return Err(bad(format!(
                "{} bytes, more than {MAX_SPEC_BYTES}",
                meta.len()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let spec: DiskSpec = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        spec.check().map_err(bad)?;
        Ok(spec)
    }

    /// Checks the values (not the files).
    pub fn check(&self) -> Result<(), String> {
        if self.version != SPEC_VERSION {
            return Err(format!(
                "version {} (this build reads {SPEC_VERSION})",
                self.version
            ));
        }
        if self.layers.is_empty() {
            return Err("no layers".into());
        }
        for l in &self.layers {
            crate::store::validate_index_name(&l.index).map_err(|e| e.to_string())?;
        }
        if !(1..=64).contains(&self.queues) {
            return Err(format!("queues {} (1 to 64)", self.queues));
        }
        if !(2..=32768).contains(&self.queue_size) || !self.queue_size.is_power_of_two() {
            return Err(format!(
                "queue_size {} (a power of two, 2 to 32768)",
                self.queue_size
            ));
        }
        if self.cache_mib == 0 || self.cache_mib > 1 << 20 {
            return Err(format!("cache_mib {} (1 to 1048576)", self.cache_mib));
        }
        Ok(())
    }

    /// The queue shape.
    pub fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            queues: self.queues,
            queue_size: self.queue_size,
        }
    }

    /// Opens the store, composes the layers, opens the write layer and the trace.
    pub fn open(&self) -> Result<Arc<LayeredDisk>, SpecError> {
        let store = ChunkStore::open(&self.store, self.key_file.as_deref())?;
        let maps = self
            .layers
            .iter()
            .map(|l| store.read_index(&l.index))
            .collect::<Result<Vec<_>, _>>()?;
        let ranges: Vec<Option<Vec<std::ops::Range<u64>>>> = self
            .layers
            .iter()
            .map(|l| {
                l.slots
                    .as_ref()
                    .map(|v| v.iter().map(|[s, e]| *s..*e).collect())
            })
            .collect();
        let input: Vec<_> = self
            .layers
            .iter()
            .zip(&maps)
            .zip(&ranges)
            .map(|((l, m), r)| (l.index.as_str(), m, r.as_deref()))
            .collect();
        let map = layers::compose(&input)?;
        let size = map.disk_size;
        let assembly = match &self.assembly {
            Some(p) => Some(layers::Assembly::create(p, size, map.slots.len()).map_err(
                |source| SpecError::Assembly {
                    path: p.clone(),
                    source,
                },
            )?),
            None => None,
        };
        let lower = ComposedImage::with_assembly(
            map,
            ChunkCache::new(store, self.cache_mib << 20),
            assembly,
        );
        let upper = match &self.write_layer {
            Some(dir) => Some(WriteLayer::open(dir, size)?),
            None => None,
        };
        let trace = match &self.trace {
            Some(p) => Some(
                Trace::open(p, self.trace_limit_mib << 20).map_err(|source| SpecError::Trace {
                    path: p.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        Ok(Arc::new(LayeredDisk::new(
            lower,
            upper,
            trace,
            self.id.clone(),
        )))
    }
}
