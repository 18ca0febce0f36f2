-- weft catalog, version 1: environments and the audit log.

-- One row per environment. `config` holds the VM configuration as JSON
-- (weft_qmp::launch::VmConfig) for managed environments; attached
-- environments are driven only through their QMP socket.
CREATE TABLE environments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL UNIQUE,
    kind        TEXT    NOT NULL CHECK (kind IN ('managed', 'attached')),
    config      TEXT,
    qmp_socket  TEXT    NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('starting', 'running', 'stopped')),
    pid         INTEGER,
    last_exit   TEXT,
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    CHECK (kind = 'attached' OR config IS NOT NULL)
);

-- Append-only record of every change requested of weftd: who, what, when, result.
CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT    NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    target  TEXT,
    detail  TEXT,
    result  TEXT    NOT NULL
);

CREATE TRIGGER audit_is_append_only_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

CREATE TRIGGER audit_is_append_only_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
