-- Edits, deletes, reactions and replies (issue 13, point 3). Each change is a message row
-- of its own (a kind below, `ref` naming its target) with its own seq, so `sub since`
-- replays it; the target row holds its current state (edited_at, deleted, body).
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_kind_check;
ALTER TABLE messages ADD CONSTRAINT messages_kind_check
    CHECK (kind IN ('text', 'comment', 'edit', 'delete', 'react', 'unreact'));
ALTER TABLE messages
    ADD COLUMN ref        bigint,   -- the target message of an edit, delete, react, unreact
    ADD COLUMN reply_to   bigint,   -- the message a text or comment answers
    ADD COLUMN edited_at  bigint,   -- ms of the last edit applied to this message
    ADD COLUMN deleted    boolean NOT NULL DEFAULT false;
-- A delete wipes the text of its target's earlier edit events too.
CREATE INDEX messages_ref ON messages (conv_id, ref) WHERE ref IS NOT NULL;

-- On the conversation's shard: one row per (message, user, emoji). Written only by the
-- sequencer, under the conversation's row lock, in seq order: counts are exact.
CREATE TABLE reactions (
    message_id  bigint NOT NULL,
    user_id     text NOT NULL,
    emoji       text NOT NULL,
    conv_id     bigint NOT NULL,
    PRIMARY KEY (message_id, user_id, emoji)
);

-- Events the sequencer refused (an edit of a message deleted meanwhile, a reaction that
-- changes nothing): never sequenced, remembered so a redelivery is refused again rather
-- than applied against a later state.
-- A retried cid of one is answered with its id, as a stored message's is.
CREATE TABLE refused_events (
    conv_id  bigint NOT NULL,
    sender   text NOT NULL,
    cid      text NOT NULL,
    id       bigint NOT NULL,
    ts       bigint NOT NULL,
    PRIMARY KEY (conv_id, sender, cid)
);
