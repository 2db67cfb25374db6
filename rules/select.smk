rule select:
    """Representative patches: report and attribute retrieval, k-means diversity, near-duplicate filter."""
    input:
        embeddings="data/embeddings/{slide}.zarr",
        prompts="data/prompts/{slide}.parquet",
        thumbnail="data/tiles/{slide}.png",
        info="data/tiles/{slide}.json",
        model=clip_files,
    output:
        selection="data/selection/{slide}.parquet",
        overlay=report("data/selection/{slide}.png", category="Selected patches", labels={"slide": "{slide}"}),
    params:
        step=step_view("select"),
        code=code_hash("select"),
    log:
        "logs/select/{slide}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        "pathgen select --slide-id {wildcards.slide} --embeddings {input.embeddings} --prompts {input.prompts}"
        " --thumbnail {input.thumbnail} --info {input.info} --params-json {params.step:q}"
        " --out {output.selection} --overlay {output.overlay} --log {log}"
