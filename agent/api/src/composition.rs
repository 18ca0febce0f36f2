//! Temporal compositions.

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/compositions/{name}/apply`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyComposition {
    /// Name of the new weave (default `w<index>`).
    #[serde(default)]
    pub weave: Option<String>,
    /// Serve its disks live through weft-blk instead of restoring them first.
    #[serde(default)]
    pub live: bool,
    /// What the weave's guest may open connections to (default: none).
    #[serde(default)]
    pub egress: crate::net::Egress,
}

/// Largest rules document accepted.
pub const MAX_RULES_BYTES: usize = 1 << 20;
/// Most rules in one composition.
pub const MAX_RULES: usize = 256;
/// Most resource patterns (or categories) in one rule.
pub const MAX_PATTERNS: usize = 64;
/// Longest name, pattern or category.
pub const MAX_TEXT: usize = 256;
/// Most conflicts one plan lists per resource before it gives up listing (the merge
/// is still refused or resolved as a whole).
pub const MAX_CONFLICTS: usize = 10_000;

/// How a rule chooses among the snapshots it admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The newest.
    #[default]
    Latest,
    /// The oldest.
    Earliest,
    /// The one nearest to `closest_to`.
    ClosestTo,
}

/// What happens when rules choose different snapshots of one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictStrategy {
    /// The newest chosen snapshot wins outright.
    #[default]
    LastWriteWins,
    /// Three-way merge against the common ancestor; what both sides changed is taken
    /// from the newer side.
    MergeByTimestamp,
    /// Three-way merge; what both sides changed is a conflict for the user to resolve.
    Prompt,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Name shown in plans (default `rule N`, from 1).
    #[serde(default)]
    pub name: Option<String>,
    /// Resource patterns: `config`, `net`, `disk:<glob>`, `data:<glob>`, `*`
    /// (`*` and `?` in globs).
    pub resources: Vec<String>,
    /// Only snapshots taken at or after this instant (RFC 3339).
    #[serde(default)]
    pub from: Option<String>,
    /// Only snapshots taken at or before this instant.
    #[serde(default)]
    pub until: Option<String>,
    /// Only snapshots with one of these categories.
    #[serde(default)]
    pub categories: Vec<String>,
    /// No snapshot with one of these categories.
    #[serde(default)]
    pub exclude_categories: Vec<String>,
    /// Exactly this snapshot (of a matching resource); no other filter may be given.
    #[serde(default)]
    pub pin: Option<i64>,
    /// How to choose among the admitted snapshots.
    #[serde(default)]
    pub strategy: Strategy,
    /// The instant `closest-to` aims at.
    #[serde(default)]
    pub closest_to: Option<String>,
}

/// A composition's rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// How disagreeing rules are settled.
    #[serde(default)]
    pub conflict: ConflictStrategy,
    /// Resources no rule names come from their newest snapshot at or before this
    /// instant (default: their newest snapshot).
    #[serde(default)]
    pub at: Option<String>,
    /// The rules, in order (TOML: `[[rule]]` tables).
    #[serde(rename = "rule", default)]
    pub rules: Vec<Rule>,
}

/// Why rules are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RulesError(pub String);

fn instant(what: &str, t: &str) -> Result<String, RulesError> {
    crate::resource::Timestamp::parse(t)
        .map(|ts| ts.canonical())
        .map_err(|e| RulesError(format!("{what} {t:?} is not an RFC 3339 time: {e}")))
}

/// A parser's message as one line: it can quote the rules' text (a field name, a
/// line of the file), so line breaks and other control characters are escaped.
fn one_line(msg: &str) -> String {
    let msg = msg.trim_end();
    let mut out = String::with_capacity(msg.len());
    for c in msg.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn check_text(what: &str, s: &str) -> Result<(), RulesError> {
    if s.is_empty() || s.len() > MAX_TEXT || s.chars().any(char::is_control) {
        return Err(RulesError(format!(
            "{what} {s:?} must be 1 to {MAX_TEXT} bytes without control characters"
        )));
    }
    Ok(())
}

/// Whether `pattern` (from a rule) names `resource`.
pub fn matches(pattern: &str, resource: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match (pattern.split_once(':'), resource.split_once(':')) {
        (Some((pt, pg)), Some((rt, rn))) => pt == rt && glob(pg.as_bytes(), rn.as_bytes()),
        (None, None) => pattern == resource,
        _ => false,
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard match with one backtrack point (linear in practice).
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        // A `*` in the pattern is a wildcard even where the name has a `*` too.
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

fn check_pattern(p: &str) -> Result<(), RulesError> {
    check_text("resource pattern", p)?;
    let ok = match p.split_once(':') {
        None => matches!(p, "*" | "config" | "net"),
        Some((t, g)) => matches!(t, "disk" | "data") && !g.is_empty(),
    };
    if ok {
        Ok(())
    } else {
        Err(RulesError(format!(
            "resource pattern {p:?}: use config, net, disk:<glob>, data:<glob> or *"
        )))
    }
}

impl Rules {
    /// Parses a rules file: TOML, or JSON when it starts with `{`.
    pub fn parse(text: &str) -> Result<Rules, RulesError> {
        if text.len() > MAX_RULES_BYTES {
            return Err(RulesError(format!(
                "the rules are {} bytes, more than {MAX_RULES_BYTES}",
                text.len()
            )));
        }
        let rules: Rules = if text.trim_start().starts_with('{') {
            serde_json::from_str(text)
                .map_err(|e| RulesError(format!("rules (JSON): {}", one_line(&e.to_string()))))?
        } else {
            toml::from_str(text).map_err(|e: toml::de::Error| {
                // toml's own message spans several lines (it quotes the file).
                let at = e.span().map_or(String::new(), |s| {
                    let before = &text.as_bytes()[..s.start.min(text.len())];
                    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
                    let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
                    format!(" at line {line}, column {column}")
                });
                RulesError(format!("rules (TOML){at}: {}", one_line(e.message())))
            })?
        };
        rules.checked()
    }

    /// Checks every rule and normalises its instants; returns the checked rules.
    pub fn checked(mut self) -> Result<Rules, RulesError> {
        if self.rules.len() > MAX_RULES {
            return Err(RulesError(format!("more than {MAX_RULES} rules")));
        }
        if let Some(t) = &self.at {
            self.at = Some(instant("at", t)?);
        }
        for (i, r) in self.rules.iter_mut().enumerate() {
            // The name labels the rule's errors: it is checked first.
            if let Some(n) = &r.name {
                check_text("name", n)
                    .map_err(|e| RulesError(format!("rule {}: {}", i + 1, e.0)))?;
            }
            let label = r.name.clone().unwrap_or_else(|| format!("rule {}", i + 1));
            let bad = |m: String| RulesError(format!("{label}: {m}"));
            if r.resources.is_empty() || r.resources.len() > MAX_PATTERNS {
                return Err(bad(format!("resources: give 1 to {MAX_PATTERNS} patterns")));
            }
            for p in &r.resources {
                check_pattern(p).map_err(|e| bad(e.0))?;
            }
            if r.categories.len() > MAX_PATTERNS || r.exclude_categories.len() > MAX_PATTERNS {
                return Err(bad(format!("at most {MAX_PATTERNS} categories")));
            }
            for c in r.categories.iter().chain(&r.exclude_categories) {
                check_text("category", c).map_err(|e| bad(e.0))?;
            }
            for (what, t) in [
                ("from", &mut r.from),
                ("until", &mut r.until),
                ("closest_to", &mut r.closest_to),
            ] {
                if let Some(v) = t {
                    *v = instant(what, v).map_err(|e| bad(e.0))?;
                }
            }
            if let (Some(f), Some(u)) = (&r.from, &r.until) {
                if f > u {
                    return Err(bad(format!("from {f} is after until {u}")));
                }
            }
            match (r.strategy, &r.closest_to) {
                (Strategy::ClosestTo, None) => {
                    return Err(bad("strategy closest-to needs closest_to".into()))
                }
                (Strategy::Latest | Strategy::Earliest, Some(_)) => {
                    return Err(bad("closest_to needs strategy = \"closest-to\"".into()))
                }
                _ => {}
            }
            if r.pin.is_some()
                && (r.from.is_some()
                    || r.until.is_some()
                    || !r.categories.is_empty()
                    || !r.exclude_categories.is_empty()
                    || r.closest_to.is_some())
            {
                return Err(bad("pin takes no other filter".into()));
            }
        }
        Ok(self)
    }

    pub fn label(&self, i: usize) -> String {
        self.rules[i]
            .name
            .clone()
            .unwrap_or_else(|| format!("rule {}", i + 1))
    }
}

/// Where a resource of a composed weave comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Origin {
    /// One snapshot.
    Snapshot {
        /// Its id.
        id: i64,
        /// Its instant.
        taken_at: String,
        /// Its category.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        category: Option<String>,
    },
    /// The provenance log replayed up to an instant (`data:` resources).
    Instant {
        /// The instant.
        at: String,
    },
    /// A three-way merge of the snapshots chosen by disagreeing rules.
    Merge {
        /// The merged snapshots, oldest first.
        sides: Vec<i64>,
        /// Their common ancestor (none: every difference counts as a change on both).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base: Option<i64>,
    },
    /// A key-level three-way merge of the provenance log's states at the instants
    /// disagreeing rules chose (`data:` resources).
    DataMerge {
        /// The instants, oldest first.
        instants: Vec<String>,
        /// The instant of the common state they are merged against.
        base: String,
    },
}

/// The plan's line for one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    /// The resource (`disk:vda`, `config`, `net`, `data:<source>`).
    pub resource: String,
    /// Where it comes from.
    pub origin: Origin,
    /// The rule that chose it (`default` when no rule names the resource), or the
    /// rules whose choices were merged or overruled, joined by `, `.
    pub rule: String,
    /// What the conflict strategy did, when rules disagreed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled: Option<String>,
}

/// A part of a resource both sides of a merge changed differently.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Conflict {
    /// The resource.
    pub resource: String,
    /// Which part: `slots A..B` (chunk-sized slots of a disk) or a JSON pointer.
    pub key: String,
    /// The snapshot each side's version comes from (older side first).
    pub sides: [i64; 2],
    /// Who resolved it how, if anyone: the snapshot whose version is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<i64>,
}

/// A composition's plan.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Plan {
    /// One line per resource of the environment.
    pub resources: Vec<Choice>,
    /// Conflicts of merges (open ones have no `resolved`).
    pub conflicts: Vec<Conflict>,
}

impl Plan {
    /// Conflicts nobody resolved yet.
    pub fn open_conflicts(&self) -> impl Iterator<Item = &Conflict> {
        self.conflicts.iter().filter(|c| c.resolved.is_none())
    }
}

/// A composition with its plan as of now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompositionView {
    /// The composition.
    pub composition: Composition,
    /// Its plan.
    pub plan: Plan,
}

/// Body of `POST /v1/compositions/{name}/resolve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// The conflict's resource (with `key`), or every conflict of it (without).
    #[serde(default)]
    pub resource: Option<String>,
    /// The conflict's key (`slots A..B` or a JSON pointer).
    #[serde(default)]
    pub key: Option<String>,
    /// Every open conflict of the composition.
    #[serde(default)]
    pub all: bool,
    /// The side to take.
    pub take: Take,
}

/// Body of `POST /v1/compositions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateComposition {
    /// Name (as environment names: a-z, 0-9, '-', up to 32).
    pub name: String,
    /// The environment.
    pub env: String,
    /// The rules (`docs/compositions.md`).
    pub rules: Rules,
}

/// A stored composition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Composition {
    /// Its name.
    pub name: String,
    /// The environment whose history it composes.
    pub env: String,
    /// Its rules.
    pub rules: Rules,
    /// Who created it.
    pub actor: String,
    /// When.
    pub created_at: String,
}

/// Which side a resolution takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Take {
    /// `"older"` or `"newer"` (by the sides' snapshot instants).
    Side(String),
    /// A snapshot id: one of the conflict's two sides.
    Snapshot(i64),
}
