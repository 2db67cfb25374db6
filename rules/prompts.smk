rule prompts:
    """Retrieval prompts of a slide: its report split into short parts, and its tissue's attributes."""
    input:
        report=slide_report,
        model=lambda wc: [config["prompts"]["llm"]["checkpoint"]] if config["prompts"]["llm"] else [],
    output:
        "data/prompts/{slide}.parquet",
    params:
        step=step_view("prompts"),
        code=code_hash("prompts"),
        tissue=lambda wc: SLIDES[wc.slide].tissue,
        project=lambda wc: SLIDES[wc.slide].project or "",
        cache=cache_args,
    log:
        "logs/prompts/{slide}.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "pathgen prompts --slide-id {wildcards.slide} --tissue={params.tissue:q} --project={params.project:q}"
        " --report='{input.report}' --params-json {params.step:q} {params.cache} --out {output} --log {log}"
