-- weft catalog, version 5: weaves. A weave is an environment (its own row in
-- environments, kind 'managed') branched from a parent environment at an instant;
-- this row ties it to its parent, its source and its network slot.
CREATE TABLE weaves (
    name        TEXT    PRIMARY KEY REFERENCES environments(name) ON DELETE CASCADE,
    parent      TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    taken_at    TEXT    NOT NULL,
    net_index   INTEGER NOT NULL UNIQUE CHECK (net_index BETWEEN 0 AND 255),
    created_at  TEXT    NOT NULL
);
CREATE INDEX weaves_by_parent ON weaves (parent);
