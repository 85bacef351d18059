-- Votes are counted from their rows (issue 11): each vote row remembers the value the
-- counters hold for it (`counted`), and the scores worker moves `counted` to `value` in the
-- same transaction as the counter update. A Kafka record then only says "this voter's row
-- on this post may need counting": a record delivered twice, or after the votes topic was
-- recreated and its offsets restarted at 0, finds nothing left to count or counts what is.
-- Rows with `counted <> value` are the votes not counted yet; gateways re-produce those
-- that stay pending (a record lost with its topic, a produce whose ack never came).
ALTER TABLE votes ADD COLUMN counted smallint NOT NULL DEFAULT 0
    CHECK (counted IN (-1, 0, 1));

-- Start from rows and counters that agree: every existing vote counted, the counters set
-- from the rows (deltas still in the old format on the topic are skipped from now on).
UPDATE votes SET counted = value WHERE counted <> value;
UPDATE posts p SET up = COALESCE(v.up, 0), down = COALESCE(v.down, 0)
FROM posts p2
LEFT JOIN (
    SELECT post_id,
           count(*) FILTER (WHERE value = 1) AS up,
           count(*) FILTER (WHERE value = -1) AS down
    FROM votes GROUP BY post_id
) v ON v.post_id = p2.id
WHERE p.id = p2.id AND (p.up, p.down) IS DISTINCT FROM (COALESCE(v.up, 0), COALESCE(v.down, 0));

CREATE INDEX votes_pending ON votes (updated_at) WHERE counted <> value;

-- Offsets no longer decide what is counted.
DROP TABLE vote_offsets;
