"""Lineage: code hashes for Snakemake's rerun trigger, dvc.yaml generated from the Snakefile,
`pathgen sync` / `pathgen audit`, and `pathgen diff` between dataset versions.

Tooling around the DAG; no step imports it.
"""
