-- Migrated users the application deleted from account_newuser since the cutover, in id order.
SELECT s.source_id
FROM migration_audit.source_state s
WHERE s.outcome = 'M' AND NOT EXISTS (SELECT 1 FROM account_newuser n WHERE n.id = s.source_id)
ORDER BY s.source_id
