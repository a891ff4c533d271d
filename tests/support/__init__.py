"""Helpers of the test suite, not tests: the fixture users, the pipeline run without Airflow, fault
tools, the browser driver, and the application writers the sync tests run beside a migration."""
