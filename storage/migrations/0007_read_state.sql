-- Read state (issue 13, point 2): each member's read pointer, the last seq they have read.
-- It only moves forward (storage/readstate.py), never past the conversation's last seq.
ALTER TABLE members ADD COLUMN read_seq bigint NOT NULL DEFAULT 0;
