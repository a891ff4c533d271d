-- Restore by difference, step 1 (children's tables before the parent's): delete the rows of the
-- live table {live} that the staged backup {staging} does not have, matched on the primary key
-- ({match}: l.key = s.key AND ...). The restore has checked that no other table points at them.
DELETE FROM {live} AS l WHERE NOT EXISTS (SELECT 1 FROM {staging} AS s WHERE {match})
