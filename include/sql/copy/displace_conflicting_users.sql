-- Target users outside this partition that hold an email (case-insensitively) or username that a
-- user of this partition takes now. The plan guarantees the rows that move are unique, so such a
-- holder's key is stale (its legacy row changed, was deleted or is rejected now): it is removed here,
-- and its own partition puts it back with its current values if it still moves.
DELETE FROM account_newuser AS t
USING stage_users AS s
WHERE t.id <> s.id
  AND (lower(t.email) = lower(s.email) OR t.username = s.username)
