-- Upper bounds of equal-sized id partitions (keyset ranges, never OFFSET): %(fractions)s are the
-- cumulative fractions 1/n, 2/n, ... (n-1)/n.
SELECT percentile_disc(%(fractions)s::float8[]) WITHIN GROUP (ORDER BY {id}) FROM {users}
