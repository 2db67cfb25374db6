# Slide side, job 2 of 2: retrieval prompts, selection and cutting the kept patches. All three are
# cheap next to embedding and a change to any of them reruns the ones after it anyway, so they share
# one job per slide (bench/dag.py: the DAG of a 7,500-slide cohort plans in under a minute).


rule select:
    """Representative patches of a slide: report and attribute prompts, retrieval, k-means diversity,
    near-duplicate filter (prompt text features through the item cache: a slide whose prompts were all
    seen loads no CLIP; k-means on the GPU when the job has one); then the kept patches cut at full
    resolution into a deterministic tar of JPEGs.
    A slide quarantined by its embed job, or here (an unreadable report), gets empty outputs."""
    input:
        wsi=slide_path,
        report=slide_report,
        embeddings="data/embeddings/{slide}.zarr",
        thumbnail="data/tiles/{slide}.png",
        info="data/tiles/{slide}.json",
        embed_status="data/tiles/{slide}.status.json",
        model=clip_files,
        llm=lambda wc: [config["prompts"]["llm"]["checkpoint"]] if config["prompts"]["llm"] else [],
    output:
        prompts="data/prompts/{slide}.parquet",
        selection="data/selection/{slide}.parquet",
        overlay=report("data/selection/{slide}.png", category="Selected patches", labels={"slide": "{slide}"}),
        patches="data/patches/{slide}.tar",
        status="data/patches/{slide}.status.json",
    params:
        wsi=slide_file,
        report=slide_report_file,
        prompts=step_view("prompts"),
        select=step_view("select"),
        patches=step_view("patches"),
        code=code_hash("prompts", "select", "patches"),
        tissue=lambda wc: SLIDES[wc.slide].tissue,
        project=lambda wc: SLIDES[wc.slide].project or "",
        cache=cache_args,
        mpp=slide_mpp,
    resources:
        mem_mb=4000,
        runtime=45,
        gpu=GPU["select"],
    log:
        prompts="logs/prompts/{slide}.log",
        select="logs/select/{slide}.log",
        patches="logs/patches/{slide}.log",
    shell:
        "pathgen prompts --slide-id {wildcards.slide} --tissue={params.tissue:q} --project={params.project:q}"
        " --report={params.report:q} --params-json {params.prompts:q} {params.cache} --out {output.prompts}"
        " --after {input.embed_status} --status {output.status} --on-slide-error {ON_SLIDE_ERROR}"
        " --log {log.prompts}"
        " && pathgen select --slide-id {wildcards.slide} --embeddings {input.embeddings} --prompts {output.prompts}"
        " --thumbnail {input.thumbnail} --info {input.info} --params-json {params.select:q} {params.cache}"
        " --out {output.selection} --overlay {output.overlay} --after {output.status} --status {output.status}"
        " --on-slide-error {ON_SLIDE_ERROR} --log {log.select}"
        " && pathgen patches {params.wsi:q} --slide-id {wildcards.slide} --mpp '{params.mpp}'"
        " --selection {output.selection} --params-json {params.patches:q} --out {output.patches}"
        " --after {output.status} --status {output.status} --on-slide-error {ON_SLIDE_ERROR} --log {log.patches}"
