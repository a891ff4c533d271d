-- Remove the given stale holders, but only while they still conflict with a staged user: a holder
-- whose own partition rewrote it in the meantime (with its current key) is left alone.
DELETE FROM account_newuser AS t
WHERE t.id = ANY(%(ids)s)
  AND EXISTS (
      SELECT 1 FROM stage_users AS s
      WHERE s.id <> t.id AND (lower(s.email) = lower(t.email) OR s.username = t.username)
  )
