-- Merge one partition's transformed users (temp table stage_users) into account_newuser: new ids
-- are inserted, changed rows updated (joined_at kept, updated_at moved), identical rows left alone.
-- Returns (inserted, updated) counts.
WITH written AS (
INSERT INTO account_newuser AS t (
    id, password, last_login, is_superuser, email, username, full_name, date_of_birth,
    phone_number, is_active, is_staff, joined_at, updated_at
)
SELECT id, password, last_login, is_superuser, email, username, full_name, date_of_birth,
       phone_number, is_active, is_staff, %(now)s, %(now)s
FROM stage_users
ORDER BY id
ON CONFLICT (id) DO UPDATE SET
    password = EXCLUDED.password,
    last_login = EXCLUDED.last_login,
    is_superuser = EXCLUDED.is_superuser,
    email = EXCLUDED.email,
    username = EXCLUDED.username,
    full_name = EXCLUDED.full_name,
    date_of_birth = EXCLUDED.date_of_birth,
    phone_number = EXCLUDED.phone_number,
    is_active = EXCLUDED.is_active,
    is_staff = EXCLUDED.is_staff,
    updated_at = EXCLUDED.updated_at
WHERE (t.password, t.last_login, t.is_superuser, t.email, t.username, t.full_name, t.date_of_birth,
       t.phone_number, t.is_active, t.is_staff)
      IS DISTINCT FROM
      (EXCLUDED.password, EXCLUDED.last_login, EXCLUDED.is_superuser, EXCLUDED.email, EXCLUDED.username,
       EXCLUDED.full_name, EXCLUDED.date_of_birth, EXCLUDED.phone_number, EXCLUDED.is_active, EXCLUDED.is_staff)
RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM written
