rule tile:
    """Segment a slide's tissue and lay the non-overlapping patch grid over it."""
    input:
        wsi=slide_path,
    output:
        grid="data/tiles/{slide}.parquet",
        thumbnail=report("data/tiles/{slide}.png", category="Tissue masks", labels={"slide": "{slide}"}),
        info="data/tiles/{slide}.json",
    params:
        step=step_view("tile"),
        code=code_hash("tile"),
        mpp=slide_mpp,
    log:
        "logs/tile/{slide}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    shell:
        "pathgen tile {input.wsi:q} --slide-id {wildcards.slide} --mpp '{params.mpp}'"
        " --params-json {params.step:q} --grid {output.grid} --thumbnail {output.thumbnail}"
        " --info {output.info} --log {log}"
