"""Benchmarks of the reservation engine (`python -m bench`, `make bench`, `make bench QUICK=1`),
and the soak test (`python -m bench.soak`, `make soak`).

The benchmark modules are one per benchmark (engine, cluster, web, expiry, reconcile, memory,
correctness);
`bench.run` starts the stores they need (a private redis-server and a throwaway Postgres database),
runs them in one process tree, checks the targets and writes the table, the JSON and the chart.
See bench/README.md.
"""
