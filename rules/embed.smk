rule embed:
    """CLIP image features of every tissue patch of a slide, into a Zarr store."""
    input:
        wsi=slide_path,
        grid="data/tiles/{slide}.parquet",
        model=clip_files,
    output:
        directory("data/embeddings/{slide}.zarr"),
    params:
        step=step_view("embed"),
        code=code_hash("embed"),
        mpp=slide_mpp,
    log:
        "logs/embed/{slide}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "pathgen embed {input.wsi:q} --slide-id {wildcards.slide} --mpp '{params.mpp}'"
        " --params-json {params.step:q} --grid {input.grid} --out {output} --threads {threads} --log {log}"
