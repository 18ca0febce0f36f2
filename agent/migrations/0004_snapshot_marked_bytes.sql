-- weft catalog, version 4: per disk snapshot, the bytes QEMU reported as dirty
-- (incremental) or allocated (full), next to the bytes actually read.
ALTER TABLE snapshots ADD COLUMN bytes_marked INTEGER;
