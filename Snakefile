"""PathGen builder: whole-slide images -> representative patches -> captions -> a WebDataset.

    snakemake                     # build everything the manifest asks for (profiles/default)
    snakemake --profile slurm     # the same on a SLURM cluster
    snakemake -n                  # what would run
    snakemake --report report.html   # one browsable page: masks, selections, plots, sample pairs

One rule file per DAG step under rules/ (the slide side is two jobs per slide:
embed = tile + embed, select = prompts + select + patches); every rule calls
`pathgen <step>` commands. dvc.yaml is generated from this file (`pathgen
dvc-yaml`), one stage per rule file. params.yaml is validated before any job;
threads and resources live in profiles/, not here.
"""

configfile: "params.yaml"


include: "rules/common.smk"
include: "rules/embed.smk"
include: "rules/select.smk"
include: "rules/caption.smk"
include: "rules/revise.smk"
include: "rules/summarize.smk"
include: "rules/assemble.smk"
include: "rules/report.smk"


rule all:
    """The dataset of every slide in the manifest and its report pages (the per-slide pictures come with
    the select and embed jobs the dataset needs; listing them here too would cost DAG time per slide)."""
    input:
        "data/dataset/manifest.parquet",
        "data/report/samples.html",
        "data/report/plots.html",


onsuccess:
    on_success(SLIDE_IDS)


onerror:
    on_error(workflow, SHARDS, SLIDE_IDS)
