# The pages `snakemake --report report.html` shows besides the per-slide pictures
# (tissue masks from rules/embed.smk, selection overlays from rules/select.smk).

report: "../report/workflow.rst"


rule report_pages:
    """Sample pairs (patch, description, revision, summary) and the dataset's metrics and plots as HTML pages."""
    input:
        manifest="data/dataset/manifest.parquet",
        tars=expand("data/dataset/{shard}.tar", shard=SHARDS),
        metrics="data/dataset/metrics.json",
        tokens="data/dataset/plots/caption_tokens.csv",
        tissues="data/dataset/plots/pairs_per_tissue.csv",
        clip_scores="data/dataset/plots/clip_scores.csv",
        failures="data/dataset/failures.tsv",
    output:
        samples=report("data/report/samples.html", caption="../report/samples.rst", category="Dataset",
                       labels={"page": "sample pairs"}),
        plots=report("data/report/plots.html", caption="../report/plots.rst", category="Dataset",
                     labels={"page": "metrics and plots"}),
    params:
        code=code_hash("report"),
        n=12,  # sample pairs on the page, spread over the slides
        seed=config["seed"],
        max_bytes=1500000,  # fewer pairs if needed: Chromium shows no larger page inside the report
    resources:
        mem_mb=2000,
        runtime=10,
    log:
        "logs/report/pages.log",
    shell:
        "pathgen report-pages --dataset-dir data/dataset --out-dir data/report --n {params.n} --seed {params.seed}"
        " --max-bytes {params.max_bytes} --log {log}"
