"""PathGen builder: whole-slide images -> representative patches -> captions -> a WebDataset.

    snakemake                     # build everything the manifest asks for (profiles/default)
    snakemake --profile slurm     # the same on a SLURM cluster
    snakemake -n                  # what would run
    snakemake --report report.html   # one browsable page: masks, selections, plots, sample pairs

One rule file per step under rules/; every rule calls `pathgen <step>`, the
same command a DVC stage runs. params.yaml is validated before any job.
"""

configfile: "params.yaml"


include: "rules/common.smk"
include: "rules/tile.smk"
include: "rules/embed.smk"
include: "rules/prompts.smk"
include: "rules/select.smk"
include: "rules/patches.smk"
include: "rules/caption.smk"
include: "rules/revise.smk"
include: "rules/summarize.smk"
include: "rules/assemble.smk"
include: "rules/report.smk"


rule all:
    """The dataset of every slide in the manifest, with the per-slide pictures."""
    input:
        "data/dataset/manifest.parquet",
        "data/report/samples.html",
        "data/report/plots.html",
        expand("data/selection/{slide}.png", slide=SLIDE_IDS),
