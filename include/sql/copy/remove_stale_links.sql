-- Links of this partition's users in a target link table ({links}: id, newuser_id, {other}) that
-- the legacy side no longer has (or has changed): removed before merge_links.sql adds the current ones.
-- {users}: the users concerned, a BETWEEN over the range or an = ANY over a change set (partition_copy).
DELETE FROM {links} AS t
WHERE t.newuser_id {users}
  AND NOT EXISTS (
      SELECT 1 FROM stage_links AS s
      WHERE s.id = t.id AND s.user_id = t.newuser_id AND s.other_id = t.{other}
  )
