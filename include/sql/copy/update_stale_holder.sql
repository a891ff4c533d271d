-- Give one stale key holder (a user elsewhere whose legacy row now has another key) its current
-- values in place, rather than deleting it: its profile, addresses, activity and notifications
-- (ON DELETE CASCADE) stay. joined_at is kept. Skipped (0 rows) when a staged user of this partition
-- takes the holder's new key; a target row holding it raises unique_violation. Either way the
-- caller falls back to displacing the holder.
UPDATE account_newuser AS t SET
    password = %(password)s, last_login = %(last_login)s, is_superuser = %(is_superuser)s,
    email = %(email)s, username = %(username)s, full_name = %(full_name)s,
    date_of_birth = %(date_of_birth)s, phone_number = %(phone_number)s, is_active = %(is_active)s,
    is_staff = %(is_staff)s, updated_at = %(now)s
WHERE t.id = %(id)s
  AND NOT EXISTS (
      SELECT 1 FROM stage_users AS s
      WHERE s.id <> t.id AND (lower(s.email) = lower(%(email)s) OR s.username = %(username)s)
  )
