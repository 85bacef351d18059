-- Feeds and the scores worker (issue 4). Applied to every physical shard.

-- Reddit's hot rank, the same formula and constants as storage/ranking.py: hot(). Redis
-- holds ranks computed in Python; this function only lets a feed rebuild read a shard's top
-- N through an index instead of ranking every post. `id >> 23` is the post's creation time
-- in ms since the id epoch (storage/ids.py), so the rank needs no timestamp column.
-- Changing a constant means a new migration (function and both indexes) together with the
-- Python constants; tests/integration/test_social.py checks the two agree.
CREATE FUNCTION agora_hot(up integer, down integer, id bigint) RETURNS double precision
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT sign((up - down)::double precision)
           * log(greatest(abs(up - down), 1)::double precision)
           + (id >> 23)::double precision / 45000000::double precision
$$;

CREATE INDEX posts_hot ON posts (agora_hot(up, down, id) DESC, id DESC)
    WHERE deleted_at IS NULL;
CREATE INDEX posts_community_hot ON posts (community, agora_hot(up, down, id) DESC, id DESC)
    WHERE deleted_at IS NULL;
CREATE INDEX posts_community_top ON posts (community, (up - down) DESC, id DESC)
    WHERE deleted_at IS NULL;

-- How far the scores worker has applied the votes topic to this shard's counters, per
-- partition. Written in the same transaction as the counter update, so a batch that Kafka
-- redelivers (a crash after the commit here, before the offset commit there) is recognised
-- and not counted twice.
CREATE TABLE vote_offsets (
    topic            text NOT NULL,
    partition        integer NOT NULL,
    applied_through  bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);
