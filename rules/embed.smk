# Slide side, job 1 of 2: the slide is read twice here (thumbnail for the mask, patches for CLIP), so
# tiling and embedding share a job; tiling costs seconds next to embedding. One job per slide per
# step would put 5 jobs per slide into the DAG (see bench/dag.py). Threads and resources: sized for the
# tiny demo models; profiles/slurm/config.yaml sizes them for the real checkpoints.


rule embed:
    """Tile a slide (tissue mask, patch grid, slide info) and embed every tissue patch with CLIP into Zarr.
    An input error of the slide quarantines it: empty outputs and the reason in the status record."""
    input:
        wsi=slide_path,
        model=clip_files,
    output:
        grid="data/tiles/{slide}.parquet",
        thumbnail=report("data/tiles/{slide}.png", category="Tissue masks", labels={"slide": "{slide}"}),
        info="data/tiles/{slide}.json",
        embeddings=directory("data/embeddings/{slide}.zarr"),
        status="data/tiles/{slide}.status.json",
    params:
        wsi=slide_file,
        tile=step_view("tile"),
        embed=step_view("embed"),
        code=code_hash("tile", "embed"),
        mpp=slide_mpp,
    threads: 2
    resources:
        mem_mb=4000,
        runtime=80,
        gpu=GPU["embed"],
        readers=2,  # patch-reading processes besides the forward's threads; they change no output byte
    log:
        tile="logs/tile/{slide}.log",
        embed="logs/embed/{slide}.log",
    shell:
        "pathgen tile {params.wsi:q} --slide-id {wildcards.slide} --mpp '{params.mpp}'"
        " --params-json {params.tile:q} --grid {output.grid} --thumbnail {output.thumbnail}"
        " --info {output.info} --status {output.status} --on-slide-error {ON_SLIDE_ERROR} --log {log.tile}"
        " && pathgen embed {params.wsi:q} --slide-id {wildcards.slide} --mpp '{params.mpp}'"
        " --params-json {params.embed:q} --grid {output.grid} --out {output.embeddings} --threads {threads}"
        " --readers {resources.readers}"
        " --after {output.status} --status {output.status} --on-slide-error {ON_SLIDE_ERROR} --log {log.embed}"
