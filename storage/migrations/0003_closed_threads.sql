-- A conversation can be closed: a deleted post's thread takes no more comments and cannot
-- be subscribed to, while its stored messages stay for the record.
ALTER TABLE conversations ADD COLUMN closed_at timestamptz;
