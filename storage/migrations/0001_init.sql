-- Agora schema v1. Applied to every physical shard: each table holds the rows of the
-- logical shards mapped to that database (rows carry their logical shard in their ids).

CREATE TABLE users (
    id          text PRIMARY KEY,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- On the shard inside the conversation id (the creator's; for a direct conversation the
-- shard of the smaller user id, so both sides find the same row without a lookup).
CREATE TABLE conversations (
    id               bigint PRIMARY KEY,
    kind             text NOT NULL CHECK (kind IN ('direct', 'group', 'thread')),
    title            text NOT NULL DEFAULT '',
    direct_key       text UNIQUE,
    created_by       text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- The source of truth for seq: fan-out workers take the next numbers from here.
    last_seq         bigint NOT NULL DEFAULT 0,
    last_message_at  timestamptz
);

CREATE TABLE members (
    conv_id    bigint NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id    text NOT NULL,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conv_id, user_id)
);

-- Each user's conversations, on the user's shard; written after the membership on the
-- conversation's shard and repairable from it.
CREATE TABLE user_conversations (
    user_id    text NOT NULL,
    conv_id    bigint NOT NULL,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, conv_id)
);

CREATE TABLE messages (
    conv_id  bigint NOT NULL,
    seq      bigint NOT NULL,
    id       bigint NOT NULL,
    sender   text NOT NULL,
    cid      text NOT NULL,
    body     text NOT NULL,
    kind     text NOT NULL DEFAULT 'text' CHECK (kind IN ('text', 'comment')),
    ts       bigint NOT NULL,
    PRIMARY KEY (conv_id, seq),
    -- A redelivered or retried message is a no-op (idempotency's last line of defence).
    UNIQUE (conv_id, sender, cid)
);
CREATE INDEX messages_id ON messages (id);

-- On the author's shard.
CREATE TABLE posts (
    id          bigint PRIMARY KEY,
    author      text NOT NULL,
    community   text NOT NULL,
    title       text NOT NULL,
    body        text NOT NULL DEFAULT '',
    thread_id   bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    up          integer NOT NULL DEFAULT 0,
    down        integer NOT NULL DEFAULT 0,
    deleted_at  timestamptz
);
CREATE INDEX posts_new ON posts (id DESC) WHERE deleted_at IS NULL;
CREATE INDEX posts_community_new ON posts (community, id DESC) WHERE deleted_at IS NULL;
CREATE INDEX posts_top ON posts ((up - down) DESC, id DESC) WHERE deleted_at IS NULL;

-- On the post's shard: one row per user per post.
CREATE TABLE votes (
    post_id     bigint NOT NULL,
    user_id     text NOT NULL,
    value       smallint NOT NULL CHECK (value IN (-1, 0, 1)),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (post_id, user_id)
);
