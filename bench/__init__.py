"""Benchmarks of bulkjob against its alternatives and its targets: `make bench` or `python -m bench`.

Every workload runs the real command line end to end (items file -> manifest -> summary) with
checkpointing and metrics on, as in production; see bench/README.md for the method.
"""
