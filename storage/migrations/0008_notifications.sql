-- The notification inbox (issue 13, point 4): a mention, a reply, or a direct message that
-- found its recipient offline. On the *conversation's* shard, written in the transaction
-- that sequences the message (so exactly once, whatever Kafka redelivers); a user's inbox
-- is read from every physical shard and merged by id (storage/notifications.py).
CREATE TABLE notifications (
    user_id     text NOT NULL,
    message_id  bigint NOT NULL,   -- also the keyset: ids are time-ordered
    conv_id     bigint NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('mention', 'reply', 'dm')),
    from_user   text NOT NULL,
    excerpt     text NOT NULL,
    ts          bigint NOT NULL,
    read_at     bigint,
    PRIMARY KEY (user_id, message_id)
);
