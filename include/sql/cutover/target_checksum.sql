-- Order-independent checksum of account_newuser: the sum of a 64-bit fingerprint of every row,
-- computed exactly as partition_copy.fingerprint() computes it for the transformed legacy rows.
SELECT count(*),
       coalesce(sum(('x' || substr(md5(concat_ws(chr(31),
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
           is_staff::int::text)), 1, 16))::bit(64)::bigint::numeric), 0)
FROM account_newuser
