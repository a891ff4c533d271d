-- What the target already knows of the id space, so the plan's ranges cover it: a partition owns
-- (and repairs or removes) every migrated user and every row of the sync state in its range.
-- Output: one row (users held in account_newuser, lowest and highest id among the target's users
-- and migration_audit.source_state's rows; NULL, NULL when both are empty).
SELECT (SELECT count(*) FROM account_newuser) AS held,
       LEAST((SELECT min(id) FROM account_newuser), (SELECT min(source_id) FROM migration_audit.source_state)),
       GREATEST((SELECT max(id) FROM account_newuser), (SELECT max(source_id) FROM migration_audit.source_state))
