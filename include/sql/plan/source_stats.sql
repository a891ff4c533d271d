-- How many legacy users there are and their id range. {users}, {id}: composed identifiers.
SELECT count(*), min({id}), max({id}) FROM {users}
