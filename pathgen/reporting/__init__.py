"""Self-contained HTML pages: the report pages of `snakemake --report` and the shared HTML helper
that `pathgen diff --html` uses too.
"""
