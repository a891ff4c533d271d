-- Carry a target link table's state back into its legacy link table ({link}: {user}, {other}, id)
-- for the users in the target (temp table rollback_scope); other legacy users' links are not
-- touched. rollback_links holds the target's links (id, user_id, other_id); every link removed or
-- added is counted per user in rollback_link_changes. Statements run in order, in one transaction.

-- 1. Links the target no longer has.
WITH removed AS (
    DELETE FROM {link} AS l
    USING rollback_scope AS s
    WHERE l.{user} = s.id
      AND NOT EXISTS (SELECT 1 FROM rollback_links AS r WHERE r.user_id = l.{user} AND r.other_id = l.{other})
    RETURNING l.{user} AS user_id
)
INSERT INTO rollback_link_changes (user_id, added, removed) SELECT user_id, 0, 1 FROM removed;

-- 2. Links the legacy table lacks, keeping the target's id where the legacy table has not used it.
WITH added AS (
    INSERT INTO {link} (id, {user}, {other})
    SELECT r.id, r.user_id, r.other_id
    FROM rollback_links AS r
    WHERE NOT EXISTS (SELECT 1 FROM {link} AS l WHERE l.{user} = r.user_id AND l.{other} = r.other_id)
      AND NOT EXISTS (SELECT 1 FROM {link} AS l WHERE l.id = r.id)
    ORDER BY r.id
    RETURNING {user} AS user_id
)
INSERT INTO rollback_link_changes (user_id, added, removed) SELECT user_id, 1, 0 FROM added;

-- 3. The id sequence past the ids just written, so the next default cannot collide with them;
--    never back, so ids of links deleted before the cutover are not handed out again.
SELECT setval(s.seq, GREATEST(coalesce(ps.last_value, 0), m.top))
FROM (SELECT pg_get_serial_sequence({qualified}, 'id')::regclass AS seq) AS s
JOIN pg_sequences AS ps
  ON (quote_ident(ps.schemaname) || '.' || quote_ident(ps.sequencename))::regclass = s.seq
CROSS JOIN (SELECT max(id) AS top FROM {link}) AS m
WHERE m.top IS NOT NULL;

-- 4. The rest (their target id is taken by another legacy link): a new id from the sequence.
WITH added AS (
    INSERT INTO {link} ({user}, {other})
    SELECT r.user_id, r.other_id
    FROM rollback_links AS r
    WHERE NOT EXISTS (SELECT 1 FROM {link} AS l WHERE l.{user} = r.user_id AND l.{other} = r.other_id)
    ORDER BY r.id
    RETURNING {user} AS user_id
)
INSERT INTO rollback_link_changes (user_id, added, removed) SELECT user_id, 1, 0 FROM added;
