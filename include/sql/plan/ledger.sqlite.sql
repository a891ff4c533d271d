-- The plan's duplicate ledger (plan.DuplicateLedger), a private SQLite file deleted after the plan.
-- Nothing here needs to survive a crash: the plan is recomputed by a retry.
PRAGMA journal_mode = OFF;
PRAGMA synchronous = OFF;
-- 1 MB of page cache (the file's pages stay in the OS cache): with 8 MB the ledger grew by
-- 9 MB from 30k to 300k candidates, with 1 MB by 1.4 MB and no more up to 1M, for ~10% more ledger time.
PRAGMA cache_size = -1024;
-- The first valid id that claimed each email key and each username.
CREATE TABLE email_claims (key TEXT PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE username_claims (key TEXT PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID;
-- The rows that lost, why, and to whom.
CREATE TABLE losers (id INTEGER PRIMARY KEY, reason TEXT NOT NULL, kept_id INTEGER NOT NULL);
