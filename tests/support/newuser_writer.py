"""A stand-in for the application after the cutover: inserts, updates and deletes rows of account_newuser.

Run as a separate process by the tests: ``python newuser_writer.py DSN STOP_FILE OUT_FILE SEED``.
Every statement is its own transaction, like a web request, and stamps the row with the database's
clock_timestamp() as it writes (after any lock wait); OUT_FILE gets every write that succeeded as
[op, id, full_name, stamp] (stamp in ISO form, for ordering against the carry-back's moments) and
the errors, as JSON.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import psycopg


def main(dsn: str, stop_file: str, out_file: str, seed: int) -> None:
    rng = random.Random(seed)
    writes: list[list] = []
    errors: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        n = 0
        while not Path(stop_file).exists():
            n += 1
            ids = [r[0] for r in conn.execute("SELECT id FROM account_newuser ORDER BY id").fetchall()]
            op = rng.choice(["insert", "insert", "update", "update", "update", "delete"])
            name = f"Newuser Writer {seed} {n}"
            try:
                if op == "insert" or not ids:
                    op = "insert"
                    row = conn.execute(
                        "INSERT INTO account_newuser (password, last_login, is_superuser, email, username, "
                        "full_name, date_of_birth, phone_number, is_active, is_staff, joined_at, updated_at) "
                        "VALUES (%s, NULL, false, %s, %s, %s, '1990-05-05', '+9779841000000', true, false, "
                        "clock_timestamp(), clock_timestamp()) RETURNING id, updated_at",
                        (
                            f"pbkdf2_sha256$nw{seed}{n}$hash=",
                            f"nw{seed}-{n}@example.com",
                            f"nw{seed}-{n}",
                            name,
                        ),
                    ).fetchone()
                elif op == "update":
                    row = conn.execute(
                        "UPDATE account_newuser SET full_name = %s, updated_at = clock_timestamp() WHERE id = %s "
                        "RETURNING id, updated_at",
                        (name, rng.choice(ids)),
                    ).fetchone()
                else:
                    name = None
                    row = conn.execute(
                        "DELETE FROM account_newuser WHERE id = %s RETURNING id, clock_timestamp()",
                        (rng.choice(ids),),
                    ).fetchone()
                if row is not None:
                    writes.append([op, row[0], name, row[1].isoformat()])
            except psycopg.Error as exc:
                errors.append(exc.diag.message_primary or str(exc))
                if len(errors) > 20:
                    break
            time.sleep(0.005)
    Path(out_file).write_text(json.dumps({"writes": writes, "errors": errors}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
