-- weft catalog, version 7: the audit log is hash-chained (F15).
--
-- One row per audit row: the hash of the previous entry and this entry's hash,
-- SHA-256 over a canonical encoding of the previous hash and every field of the audit
-- row (docs/audit.md). weftd chains rows written before this version once, at start.
CREATE TABLE audit_chain (
    id         INTEGER PRIMARY KEY REFERENCES audit(id),
    prev_hash  BLOB    NOT NULL CHECK (length(prev_hash) = 32),
    hash       BLOB    NOT NULL CHECK (length(hash) = 32)
);

CREATE TRIGGER audit_chain_is_append_only_update BEFORE UPDATE ON audit_chain
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

CREATE TRIGGER audit_chain_is_append_only_delete BEFORE DELETE ON audit_chain
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
