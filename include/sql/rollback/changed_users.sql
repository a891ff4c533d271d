-- Rows of account_newuser the application added (%(new)s true) or changed (false) since the sync state
-- was written, in id order: a row is changed when its fingerprint (see row_fingerprint.sql)
-- differs from the one recorded when it was migrated. The columns are NewUser's, in its order.
SELECT id, password, last_login, is_superuser, email, username, full_name, date_of_birth,
       phone_number, is_active, is_staff
FROM (
    SELECT n.*, s.source_id AS known_id, s.fingerprint AS known_fingerprint
    FROM account_newuser n
    LEFT JOIN migration_audit.source_state s ON s.source_id = n.id AND s.outcome = 'M'
) AS t
WHERE CASE WHEN %(new)s THEN known_id IS NULL
           ELSE known_id IS NOT NULL AND known_fingerprint <> (
{fingerprint}
) END
ORDER BY id
