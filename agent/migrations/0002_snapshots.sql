-- weft catalog, version 2: snapshots of resources, and jobs.

-- One row per snapshot of one resource of one environment. A disk snapshot is
-- 'pending' while its data is read; its block map (index_name, in the chunk store)
-- is written only after all its chunks are durable, and the row becomes
-- 'complete' only after that. weftd marks rows still 'pending' at start as
-- 'failed': no partial snapshot is ever visible as complete.
CREATE TABLE snapshots (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    env          TEXT    NOT NULL,
    resource     TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('pending', 'complete', 'failed')),
    kind         TEXT    NOT NULL CHECK (kind IN ('full', 'incremental', 'config')),
    taken_at     TEXT    NOT NULL,
    finished_at  TEXT,
    actor        TEXT    NOT NULL,
    category     TEXT,
    note         TEXT,
    parent       INTEGER REFERENCES snapshots(id),
    size         INTEGER,
    checksum     TEXT,
    index_name   TEXT,
    checkpoint   TEXT,
    bytes_read   INTEGER,
    bytes_new    INTEGER,
    reason       TEXT,
    error        TEXT,
    config       TEXT
);
CREATE INDEX snapshots_by_env ON snapshots (env, resource, taken_at);

-- Long operations (backups, restores), with progress.
CREATE TABLE jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT    NOT NULL,
    target       TEXT    NOT NULL,
    actor        TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    started_at   TEXT    NOT NULL,
    finished_at  TEXT,
    done_bytes   INTEGER NOT NULL DEFAULT 0,
    total_bytes  INTEGER NOT NULL DEFAULT 0,
    result       TEXT,
    error        TEXT
);
