rule assemble_shard:
    """Pack a shard's pairs into a WebDataset tar (jpg/txt/json per pair), its manifest part and its slides'
    statuses (quarantined slides have no pairs). Each pair's clip_score is the cosine of its stored CLIP
    feature and its caption's text feature (through the item cache: a shard whose captions were all seen
    loads no CLIP); pairs below assemble.min_clip_score are left out and counted."""
    input:
        patches=shard_patch_tars,
        selection=lambda wc: [f"data/selection/{s}.parquet" for s in SHARDS[wc.shard]],
        tiles=lambda wc: [f"data/tiles/{s}.json" for s in SHARDS[wc.shard]],
        embeddings=lambda wc: [f"data/embeddings/{s}.zarr" for s in SHARDS[wc.shard]],
        model=clip_files,
        captions="data/captions/{shard}.parquet",
        revised="data/revised/{shard}.parquet",
        summaries="data/summaries/{shard}.parquet",
        status=shard_status,
    output:
        tar="data/dataset/{shard}.tar",
        part="data/dataset/parts/{shard}.parquet",
        slides="data/dataset/parts/{shard}.slides.json",
    params:
        step=step_view("assemble"),
        code=code_hash("assemble"),
        slides=shard_entries_json,
        cache=cache_args,
    resources:
        mem_mb=4000,  # as select: the CLIP is loaded on a text cache miss
        runtime=30,
    log:
        log="logs/assemble/{shard}.log",
        stats="logs/assemble/{shard}.stats.json",
    shell:
        "pathgen assemble-shard --shard {wildcards.shard} --slides-json {params.slides:q} --data-dir data"
        " --out-dir data/dataset --params-json {params.step:q} {params.cache} --stats {log.stats} --log {log.log}"


rule assemble:
    """The dataset: manifest.parquet, sizes.json, metrics, plot data, the PathGen-1.6M JSON export and
    failures.tsv (quarantined slides). After a failed run, the onerror handler assembles what completed."""
    input:
        tars=expand("data/dataset/{shard}.tar", shard=SHARDS),
        parts=expand("data/dataset/parts/{shard}.parquet", shard=SHARDS),
        slides=expand("data/dataset/parts/{shard}.slides.json", shard=SHARDS),
    output:
        manifest="data/dataset/manifest.parquet",
        sizes="data/dataset/sizes.json",
        metrics="data/dataset/metrics.json",
        tokens="data/dataset/plots/caption_tokens.csv",
        tissues="data/dataset/plots/pairs_per_tissue.csv",
        clip_scores="data/dataset/plots/clip_scores.csv",
        export="data/dataset/pathgen-1.6m.json",
        failures="data/dataset/failures.tsv",
    params:
        code=code_hash("assemble"),
        shards=" ".join(SHARDS),
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        "logs/assemble/all.log",
    shell:
        "pathgen assemble --out-dir data/dataset --shards {params.shards} --log {log}"
