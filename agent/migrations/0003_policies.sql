-- weft catalog, version 3: snapshot policies (schedules with retention).
-- Every run, successful or not, updates last_run/last_result and is audited;
-- a failed run is retried with backoff (failures counts consecutive ones).
CREATE TABLE policies (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    env          TEXT    NOT NULL,
    resource     TEXT    NOT NULL,
    every_secs   INTEGER NOT NULL CHECK (every_secs >= 1),
    category     TEXT,
    keep         TEXT    NOT NULL,
    next_run     TEXT    NOT NULL,
    last_run     TEXT,
    last_result  TEXT,
    failures     INTEGER NOT NULL DEFAULT 0,
    UNIQUE (env, resource)
);
