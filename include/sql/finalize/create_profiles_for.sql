-- create_profiles.sql for the users %(ids)s only: the cutover's final sync adds the profiles of the
-- users it inserted without scanning the whole table under its lock. rowcount = profiles created.
INSERT INTO account_profile (user_id, bio, avatar, updated_at)
SELECT u.id, NULL, NULL, %(now)s
FROM account_newuser AS u
WHERE u.id = ANY(%(ids)s) AND NOT EXISTS (SELECT 1 FROM account_profile AS p WHERE p.user_id = u.id)
ORDER BY u.id
