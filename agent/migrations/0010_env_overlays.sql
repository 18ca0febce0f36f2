-- weft catalog, version 9: the qcow2 overlays weft itself put under an environment's
-- disks (a weave "from now" freezes the images below and gives the environment a new
-- top). The row is written before QEMU switches to the overlay (`pending`) and marked
-- `active` once it has; recovery settles pending rows against QEMU's `query-block`.
-- `origin` is the image the user gave for that disk: `env delete` commits the
-- overlays down into it, so no write of the guest is lost.
CREATE TABLE env_overlays (
    env           TEXT    NOT NULL REFERENCES environments(name) ON DELETE CASCADE,
    disk          TEXT    NOT NULL,
    path          TEXT    NOT NULL,
    below         TEXT    NOT NULL,
    origin        TEXT    NOT NULL,
    origin_format TEXT    NOT NULL CHECK (origin_format IN ('raw', 'qcow2')),
    state         TEXT    NOT NULL CHECK (state IN ('pending', 'active')),
    created_at    TEXT    NOT NULL,
    PRIMARY KEY (env, path)
);
