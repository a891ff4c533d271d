-- Every user that may share an email (compared case-insensitively after trimming) or a username
-- with another user: the members of groups with more than one row, the users with unusual emails
-- (see unusual_emails.sql), plus the plain-ASCII users whose key equals one of %(keys)s (the keys
-- of the unusual emails, computed in Python). For plain-ASCII
-- text, lower(btrim(...)) under the "C" collation equals Python's str.strip().lower() exactly.
WITH keyed AS (
    SELECT {id} AS id, lower(btrim({email}, %(blank)s) COLLATE "C") AS email_key
    FROM {users}
    WHERE {email} ~ %(plain)s
),
shared_email AS (
    SELECT email_key FROM keyed GROUP BY email_key HAVING count(*) > 1
),
shared_username AS (
    SELECT {username} AS username FROM {users} GROUP BY {username} HAVING count(*) > 1
)
SELECT {select_list}
FROM {users}
WHERE {id} IN (
    SELECT id FROM keyed WHERE email_key IN (SELECT email_key FROM shared_email) OR email_key = ANY(%(keys)s)
    UNION
    SELECT {id} FROM {users} WHERE {username} IN (SELECT username FROM shared_username)
    UNION
    SELECT {id} FROM {users} WHERE {email} IS NOT NULL AND {email} !~ %(plain)s
)
ORDER BY {id}
