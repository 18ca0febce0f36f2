-- weft catalog, version 6: the network setup of environments (the `net` resource).

-- Each environment's guest address plan (no row: 192.168.100.2/24 via 192.168.100.1),
-- and the weave its ports go to now (`active`; NULL: the environment itself).
-- A weave has a row too: the plan it got from its environment's net setup at its instant.
CREATE TABLE env_net (
    env           TEXT    PRIMARY KEY REFERENCES environments(name) ON DELETE CASCADE,
    guest_ip      TEXT    NOT NULL,
    guest_prefix  INTEGER NOT NULL CHECK (guest_prefix BETWEEN 1 AND 30),
    gateway       TEXT    NOT NULL,
    active        TEXT
);

-- Host ports of an environment: published by it (`weft env expose`, published = 1) or
-- routed to one of its weaves (`weft weave route`, published = 0). `target` is where
-- new connections go now: the environment itself (its guest at guest_ip, or at its
-- plan's address when NULL) or one of its weaves.
CREATE TABLE host_ports (
    host_port   INTEGER PRIMARY KEY CHECK (host_port BETWEEN 1 AND 65535),
    env         TEXT    NOT NULL REFERENCES environments(name) ON DELETE CASCADE,
    guest_port  INTEGER NOT NULL CHECK (guest_port BETWEEN 1 AND 65535),
    guest_ip    TEXT,
    published   INTEGER NOT NULL CHECK (published IN (0, 1)),
    target      TEXT    NOT NULL,
    created_at  TEXT    NOT NULL
);
CREATE INDEX host_ports_by_env ON host_ports (env);

-- Kernel objects this weftd may have made: recorded before they are created, forgotten
-- after they are removed. At start, weftd removes those its catalog no longer wants and
-- never touches anything it does not own (other daemons may share the host).
-- kind: 'netns' (weft-<weave>), 'index' (host link wh<index>), 'port' (route chains).
CREATE TABLE net_owned (
    kind  TEXT NOT NULL CHECK (kind IN ('netns', 'index', 'port')),
    name  TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);

-- Snapshots of the `net` resource: kind 'net', the setup as JSON in `net`. SQLite cannot
-- change a CHECK constraint in place, so the table is rebuilt (renaming the old one first
-- keeps its self-reference `parent` valid while rows are copied).
ALTER TABLE snapshots RENAME TO snapshots_v5;
CREATE TABLE snapshots (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    env          TEXT    NOT NULL,
    resource     TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('pending', 'complete', 'failed')),
    kind         TEXT    NOT NULL CHECK (kind IN ('full', 'incremental', 'config', 'net')),
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
    config       TEXT,
    bytes_marked INTEGER,
    net          TEXT
);
INSERT INTO snapshots (id, env, resource, state, kind, taken_at, finished_at, actor, category,
                       note, parent, size, checksum, index_name, checkpoint, bytes_read,
                       bytes_new, reason, error, config, bytes_marked)
    SELECT id, env, resource, state, kind, taken_at, finished_at, actor, category,
           note, parent, size, checksum, index_name, checkpoint, bytes_read,
           bytes_new, reason, error, config, bytes_marked
    FROM snapshots_v5 ORDER BY id;
-- Ids are never reused (restored bases are named after them): carry the sequence over.
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'snapshots', seq FROM sqlite_sequence WHERE name = 'snapshots_v5'
    AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'snapshots');
UPDATE sqlite_sequence
    SET seq = MAX(seq, (SELECT seq FROM sqlite_sequence WHERE name = 'snapshots_v5'))
    WHERE name = 'snapshots'
    AND EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'snapshots_v5');
DROP TABLE snapshots_v5;
CREATE INDEX snapshots_by_env ON snapshots (env, resource, taken_at);
