-- One account_profile per migrated user that has none yet (idempotent: existing profiles, and any
-- bio/avatar users wrote there, are never touched). Returns nothing; rowcount = profiles created.
INSERT INTO account_profile (user_id, bio, avatar, updated_at)
SELECT u.id, NULL, NULL, %(now)s
FROM account_newuser AS u
WHERE NOT EXISTS (SELECT 1 FROM account_profile AS p WHERE p.user_id = u.id)
ORDER BY u.id
