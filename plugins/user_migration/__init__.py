"""Operators, hooks and plain modules of the user_migration DAG bundle."""
