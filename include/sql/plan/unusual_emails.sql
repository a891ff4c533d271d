-- Users whose email holds anything beyond printable ASCII and ASCII white space. For these, case
-- folding and trimming in SQL may differ from Python's, so their duplicate keys are computed in Python.
SELECT {select_list}
FROM {users}
WHERE {email} IS NOT NULL AND {email} !~ %(plain)s
ORDER BY {id}
