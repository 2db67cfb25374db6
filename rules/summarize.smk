rule summarize:
    """Condense every revised description of a shard to CLIP's 77 tokens with the text LLM."""
    input:
        revised="data/revised/{shard}.parquet",
        model=model_files("summarize"),
    output:
        "data/summaries/{shard}.parquet",
    params:
        step=step_view("summarize"),
        code=code_hash("summarize"),
        cache=cache_args,
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=GPU["summarize"],
    log:
        log="logs/summarize/{shard}.log",
        stats="logs/summarize/{shard}.stats.json",
    shell:
        "pathgen summarize --shard {wildcards.shard} --revised {input.revised} --params-json {params.step:q}"
        " {params.cache} --threads {threads} --out {output} --stats {log.stats} --log {log.log}"
