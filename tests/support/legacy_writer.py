"""A stand-in for the legacy application: inserts, updates and deletes users until told to stop.

Run as a separate process by the tests: ``python legacy_writer.py DSN STOP_FILE OUT_FILE SEED``.
Every statement is its own transaction, like a web request; the outcome (operations, errors,
the longest a statement waited) is written to OUT_FILE as JSON.
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
    stats = {"ops": 0, "inserted": 0, "updated": 0, "deleted": 0, "errors": [], "max_seconds": 0.0}
    with psycopg.connect(dsn, autocommit=True) as conn:
        n = 0
        # Read once, then kept up to date: re-reading every id per write would dwarf the writes at 200k users.
        ids = [r[0] for r in conn.execute("SELECT id FROM account_user ORDER BY id").fetchall()]
        while not Path(stop_file).exists():
            n += 1
            op = rng.choice(["insert", "insert", "update", "update", "update", "delete"])
            started = time.monotonic()
            try:
                if op == "insert" or not ids:
                    dirty = rng.random() < 0.2
                    inserted = conn.execute(
                        "INSERT INTO account_user (password, last_login, is_superuser, email, username, full_name, "
                        "date_of_birth, phone_number, is_active, is_staff) "
                        "VALUES (%s, NULL, false, %s, %s, %s, '1990-05-05', %s, true, false) RETURNING id",
                        (
                            f"pbkdf2_sha256$600000$w{seed}{n}$hash{n}=",
                            "not-an-email" if dirty else f"writer{seed}-{n}@example.com",
                            f"writer{seed}-{n}",
                            f"Writer {n}",
                            f"98{rng.choice('0124'):s}{rng.randrange(10**7):07d}",
                        ),
                    )
                    ids.append(inserted.fetchone()[0])
                    stats["inserted"] += 1
                elif op == "update":
                    target = rng.choice(ids)
                    field, value = rng.choice(
                        [
                            ("full_name", f"Renamed {n}"),
                            ("phone_number", f"985{rng.randrange(10**7):07d}"),
                            ("email", f"moved{seed}-{n}@Example.org"),
                            ("password", f"pbkdf2_sha256$600000$new{n}$hash="),
                            ("is_active", rng.random() < 0.5),
                        ]
                    )
                    conn.execute(f"UPDATE account_user SET {field} = %s WHERE id = %s", (value, target))
                    stats["updated"] += 1
                else:
                    target = rng.choice(ids)
                    with conn.transaction():
                        conn.execute("DELETE FROM account_user_groups WHERE user_id = %s", (target,))
                        conn.execute(
                            "DELETE FROM account_user_user_permissions WHERE user_id = %s", (target,)
                        )
                        conn.execute("DELETE FROM account_user WHERE id = %s", (target,))
                    ids.remove(target)
                    stats["deleted"] += 1
            except psycopg.Error as exc:
                stats["errors"].append(exc.diag.message_primary or str(exc))
                if len(stats["errors"]) > 20:
                    break
            stats["max_seconds"] = max(stats["max_seconds"], time.monotonic() - started)
            stats["ops"] += 1
            time.sleep(0.005)
    Path(out_file).write_text(json.dumps(stats))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
