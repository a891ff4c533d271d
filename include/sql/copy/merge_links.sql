-- Add this partition's legacy links (temp table stage_links) to a target link table ({links}) for
-- the users that are in the target; link ids are kept. Run after remove_stale_links.sql.
INSERT INTO {links} (id, newuser_id, {other})
SELECT s.id, s.user_id, s.other_id
FROM stage_links AS s
JOIN account_newuser AS u ON u.id = s.user_id
WHERE NOT EXISTS (SELECT 1 FROM {links} AS t WHERE t.id = s.id)
ORDER BY s.id
