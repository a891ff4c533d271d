-- How many of the capture triggers of the given tables exist and are enabled (origin or always
-- firing). %(tables)s: regclass oids. Returns (present, enabled).
SELECT count(*), count(*) FILTER (WHERE t.tgenabled IN ('O', 'A'))
FROM pg_trigger AS t
WHERE t.tgrelid = ANY(%(tables)s) AND t.tgname LIKE 'user\_migration\_capture\_%%' AND NOT t.tgisinternal
