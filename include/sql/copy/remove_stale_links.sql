-- Links of this partition's users in a target link table ({links}: id, newuser_id, {other}) that
-- the legacy side no longer has (or has changed): removed before merge_links.sql adds the current ones.
DELETE FROM {links} AS t
WHERE t.newuser_id BETWEEN %(lo)s AND %(hi)s
  AND NOT EXISTS (
      SELECT 1 FROM stage_links AS s
      WHERE s.id = t.id AND s.user_id = t.newuser_id AND s.other_id = t.{other}
  )
