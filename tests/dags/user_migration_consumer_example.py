"""Example consumer of the migration's asset events (not deployed: copy it into a DAG folder).

Runs after every successful pass of user_migration (the alias ``user_migration_target_users``,
resolved at run time to ``postgres://host:port/database/public/account_newuser``) and prints the
pass's counts from the event's extra. A consumer of cutovers only would schedule on
``AssetAlias("user_migration_cutover")`` instead and read run_id, checksums and write_pause_seconds.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG, AssetAlias, task

with DAG(
    dag_id="user_migration_consumer_example",
    schedule=AssetAlias("user_migration_target_users"),
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    tags=["migration", "example"],
    default_args={"owner": "data-platform"},
):

    @task
    def after_pass(triggering_asset_events=None) -> list[dict]:
        seen = []
        for asset, events in (triggering_asset_events or {}).items():
            for event in events:
                extra = event.extra or {}
                print(
                    f"{asset.uri}: pass {extra.get('run_id')} migrated {extra.get('migrated')} "
                    f"(+{extra.get('inserted')} ~{extra.get('updated')} -{extra.get('removed')}), "
                    f"rejected {extra.get('rejected')}"
                )
                seen.append({"uri": asset.uri, **extra})
        return seen

    after_pass()
