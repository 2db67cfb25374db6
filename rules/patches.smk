rule patches:
    """Cut a slide's kept patches at full resolution into a deterministic tar of JPEGs."""
    input:
        wsi=slide_path,
        selection="data/selection/{slide}.parquet",
    output:
        "data/patches/{slide}.tar",
    params:
        step=step_view("patches"),
        code=code_hash("patches"),
        mpp=slide_mpp,
    log:
        "logs/patches/{slide}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    shell:
        "pathgen patches {input.wsi:q} --slide-id {wildcards.slide} --mpp '{params.mpp}'"
        " --selection {input.selection} --params-json {params.step:q} --out {output} --log {log}"
