-- Target users outside the staged set holding an email (case-insensitively) or a username that a
-- staged user of this partition takes. Two joins rather than one OR, so each uses its unique index.
SELECT t.id AS holder, s.id AS staged, true AS same_email, false AS same_username
FROM stage_users AS s
JOIN account_newuser AS t ON lower(t.email) = lower(s.email) AND t.id <> s.id
UNION ALL
SELECT t.id, s.id, false, true
FROM stage_users AS s
JOIN account_newuser AS t ON t.username = s.username AND t.id <> s.id
