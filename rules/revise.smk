rule revise:
    """Correct every description of a shard against its image with the revise agent's JSON operations."""
    input:
        captions="data/captions/{shard}.parquet",
        patches=shard_patch_tars,
        model=model_files("revise"),
    output:
        "data/revised/{shard}.parquet",
    params:
        step=step_view("revise"),
        code=code_hash("revise"),
        slides=shard_slides_json,
        cache=cache_args,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=GPU["revise"],
    log:
        log="logs/revise/{shard}.log",
        stats="logs/revise/{shard}.stats.json",
    shell:
        "pathgen revise --shard {wildcards.shard} --slides-json {params.slides:q} --patches {input.patches}"
        " --captions {input.captions} --params-json {params.step:q} {params.cache} --threads {threads}"
        " --out {output} --stats {log.stats} --log {log.log}"
