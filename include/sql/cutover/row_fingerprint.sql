-- The 64-bit fingerprint of one account_newuser row (its columns by their bare names), exactly as
-- partition_copy.fingerprint() computes it in Python: the first 8 bytes of the md5 of the fields
-- joined by chr(31), as a signed big-endian integer. tests/test_fingerprint.py holds them together.
('x' || substr(md5(concat_ws(chr(31),
    id::text,
    password,
    coalesce(to_char(last_login AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), ''),
    is_superuser::int::text,
    email,
    username,
    full_name,
    to_char(date_of_birth, 'YYYY-MM-DD'),
    phone_number,
    is_active::int::text,
    is_staff::int::text)), 1, 16))::bit(64)::bigint
