-- Users of this partition's id range that are in the target but not among the rows that move now
-- (deleted from the legacy table, or now rejected): removed, so the target equals the transform of
-- the source. Their profiles and links go with them (ON DELETE CASCADE).
DELETE FROM account_newuser AS t
WHERE t.id BETWEEN %(lo)s AND %(hi)s
  AND NOT EXISTS (SELECT 1 FROM stage_users AS s WHERE s.id = t.id)
