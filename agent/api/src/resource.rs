//! The names of what weft records: a resource id (`disk:<name>`, `config`, `net`,
//! `data:<source>`, `file:<glob>`) and an instant (RFC 3339, UTC). One parser each, so
//! the daemon, the planner and the CLI read them alike.

use std::time::{SystemTime, UNIX_EPOCH};

/// One recordable part of an environment, as the API and the catalog write it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceId {
    /// `disk:<name>`: one of its disks.
    Disk(String),
    /// `config`: its VM configuration.
    Config,
    /// `net`: its network setup.
    Net,
    /// `data:<source>`: an application data source the DPA captures.
    Data(String),
    /// `file:<glob>` (through the DPA) or `file:<disk>:<glob>` (inside a disk snapshot).
    File(String),
}

impl ResourceId {
    /// Parses a resource id; `None` for anything else (such as `all`).
    pub fn parse(s: &str) -> Option<ResourceId> {
        let named = |rest: &str| (!rest.is_empty()).then(|| rest.to_string());
        match s {
            "config" => Some(ResourceId::Config),
            "net" => Some(ResourceId::Net),
            _ => {
                let (kind, rest) = s.split_once(':')?;
                match kind {
                    "disk" => named(rest).map(ResourceId::Disk),
                    "data" => named(rest).map(ResourceId::Data),
                    "file" => named(rest).map(ResourceId::File),
                    _ => None,
                }
            }
        }
    }

    /// The disk's name, for a `disk:` resource.
    pub fn disk(&self) -> Option<&str> {
        match self {
            ResourceId::Disk(d) => Some(d),
            _ => None,
        }
    }

    /// The disk's name of resource text `s`, if it is a `disk:` resource.
    pub fn disk_of(s: &str) -> Option<String> {
        match ResourceId::parse(s)? {
            ResourceId::Disk(d) => Some(d),
            _ => None,
        }
    }
}

impl std::fmt::Display for ResourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResourceId::Disk(d) => write!(f, "disk:{d}"),
            ResourceId::Config => f.write_str("config"),
            ResourceId::Net => f.write_str("net"),
            ResourceId::Data(s) => write!(f, "data:{s}"),
            ResourceId::File(g) => write!(f, "file:{g}"),
        }
    }
}

/// An instant, read from RFC 3339 text (`2026-11-22T10:00:00Z`, fractions allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(SystemTime);

/// Why a text is not an instant weft can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// Not RFC 3339.
    #[error("{0}")]
    Syntax(String),
    /// Before the Unix epoch.
    #[error("is before 1970")]
    BeforeEpoch,
    /// Too far away for µs in an `i64`.
    #[error("is too far away")]
    OutOfRange,
}

impl Timestamp {
    /// Parses RFC 3339 text.
    pub fn parse(t: &str) -> Result<Timestamp, TimeError> {
        humantime::parse_rfc3339_weak(t)
            .map(Timestamp)
            .map_err(|e| TimeError::Syntax(e.to_string()))
    }

    /// The canonical text: UTC, with µs (`2026-11-22T10:00:00.000000Z`), as the catalog
    /// stores instants, so that they sort as text.
    pub fn canonical(&self) -> String {
        humantime::format_rfc3339_micros(self.0).to_string()
    }

    /// µs since the Unix epoch.
    pub fn micros(&self) -> Result<i64, TimeError> {
        let d = self
            .0
            .duration_since(UNIX_EPOCH)
            .map_err(|_| TimeError::BeforeEpoch)?;
        i64::try_from(d.as_micros()).map_err(|_| TimeError::OutOfRange)
    }

    /// The instant as a `SystemTime`.
    pub fn system_time(&self) -> SystemTime {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_ids_parse_and_print_back() {
        for s in [
            "disk:vda",
            "config",
            "net",
            "data:/srv/app.db",
            "file:/etc/*.conf",
        ] {
            let id = ResourceId::parse(s).expect(s);
            assert_eq!(id.to_string(), s);
        }
        assert_eq!(ResourceId::disk_of("disk:vdb").as_deref(), Some("vdb"));
        assert_eq!(ResourceId::disk_of("data:x"), None);
        for bad in ["all", "disk:", "disks:vda", "", "config:x"] {
            assert_eq!(ResourceId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn instants_parse_to_canonical_text_and_micros() {
        let t = Timestamp::parse("2026-11-22T10:00:00Z").unwrap();
        assert_eq!(t.canonical(), "2026-11-22T10:00:00.000000Z");
        assert_eq!(t.micros().unwrap(), 1_795_341_600_000_000);
        assert!(matches!(
            Timestamp::parse("yesterday"),
            Err(TimeError::Syntax(_))
        ));
        // humantime reads nothing before 1970.
        assert!(Timestamp::parse("1969-12-31T23:59:59Z").is_err());
    }
}
