-- weft catalog, version 11: where an environment's QEMU runs, stored with the environment
-- when it is made. `netns` is the network namespace file QEMU enters (NULL: the host's);
-- `cgroup` is the name of its cgroups under weft's group in each hierarchy (NULL: none).
-- Environments without a row run in the host's namespaces. Weaves made before this
-- version get the placement their names gave them then.
CREATE TABLE env_placement (
    env    TEXT PRIMARY KEY REFERENCES environments(name) ON DELETE CASCADE,
    netns  TEXT,
    cgroup TEXT
);
INSERT INTO env_placement (env, netns, cgroup)
    SELECT name, '/run/netns/weft-' || name, name FROM weaves;
