-- weft catalog, version 9: a weave's egress policy, part of its `net` resource.
-- 'none' (the default): the guest opens no connection anywhere; 'internet': only to
-- public addresses (not the host, other weaves or private networks); 'all': anywhere.
-- Connections routed to the guest work under every policy.
ALTER TABLE env_net ADD COLUMN egress TEXT NOT NULL DEFAULT 'none'
    CHECK (egress IN ('none', 'internet', 'all'));
