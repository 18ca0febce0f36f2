-- weft catalog, version 10: the taps in the root namespace that an environment's QEMU,
-- started by weftd, created (the tap did not exist just before): the only links of the
-- root namespace besides a weave's `wh<index>` whose settings weft changes
-- (`route_localnet`, for host-local clients of published ports). A tap that exists
-- when weftd starts the QEMU is someone else's and has no row.
CREATE TABLE env_taps (
    name TEXT PRIMARY KEY,
    env  TEXT NOT NULL REFERENCES environments(name) ON DELETE CASCADE
);
