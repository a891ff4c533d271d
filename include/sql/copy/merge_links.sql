-- Add this partition's legacy links (temp table stage_links) to a target link table ({links}) for
-- the users that are in the target; link ids are kept. Run after remove_stale_links.sql. A link
-- that moved to another user is updated in place: its old user may lie in a partition that runs
-- later (and would then remove it), or in none that reads the change log again.
INSERT INTO {links} AS t (id, newuser_id, {other})
SELECT s.id, s.user_id, s.other_id
FROM stage_links AS s
JOIN account_newuser AS u ON u.id = s.user_id
ORDER BY s.id
ON CONFLICT (id) DO UPDATE SET newuser_id = EXCLUDED.newuser_id, {other} = EXCLUDED.{other}
WHERE (t.newuser_id, t.{other}) IS DISTINCT FROM (EXCLUDED.newuser_id, EXCLUDED.{other})
