rule caption:
    """Describe every patch of a shard with the describe LMM (calls the model only for cache misses)."""
    input:
        patches=shard_patch_tars,
        model=model_files("describe"),
    output:
        "data/captions/{shard}.parquet",
    params:
        step=step_view("caption"),
        code=code_hash("caption"),
        slides=shard_slides_json,
        cache=cache_args,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=GPU["caption"],
    log:
        log="logs/caption/{shard}.log",
        stats="logs/caption/{shard}.stats.json",
    shell:
        "pathgen caption --shard {wildcards.shard} --slides-json {params.slides:q} --patches {input.patches}"
        " --params-json {params.step:q} {params.cache} --threads {threads} --out {output}"
        " --stats {log.stats} --log {log.log}"
