-- weft catalog, version 8: temporal compositions (F11, F12) and where each resource of
-- a weave came from (F15).

-- A composition: rules over one environment's history (JSON of weft::compose::Rules).
CREATE TABLE compositions (
    name        TEXT    PRIMARY KEY,
    env         TEXT    NOT NULL REFERENCES environments(name) ON DELETE CASCADE,
    rules       TEXT    NOT NULL,
    actor       TEXT    NOT NULL,
    created_at  TEXT    NOT NULL
);

-- The conflicts of its merges as its plan found them at creation (and at every plan
-- since: new ones are added), and how the user resolved them: `resolved` is the
-- snapshot whose version is taken (one of side_a, side_b), NULL while open.
CREATE TABLE composition_conflicts (
    composition  TEXT    NOT NULL REFERENCES compositions(name) ON DELETE CASCADE,
    resource     TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    side_a       INTEGER NOT NULL,
    side_b       INTEGER NOT NULL,
    resolved     INTEGER CHECK (resolved IS NULL OR resolved = side_a OR resolved = side_b),
    resolved_by  TEXT,
    resolved_at  TEXT,
    PRIMARY KEY (composition, resource, key)
);

-- Where each resource of a weave came from: a snapshot, an instant of the provenance
-- log, or (merged disks) a snapshot per range of chunk-sized slots (`part`).
CREATE TABLE weave_sources (
    weave     TEXT    NOT NULL,
    resource  TEXT    NOT NULL,
    part      TEXT    NOT NULL DEFAULT '',
    snapshot  INTEGER,
    instant   TEXT,
    detail    TEXT,
    PRIMARY KEY (weave, resource, part)
);
