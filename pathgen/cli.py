"""`pathgen <step> ...`: one command per pipeline step, called by Snakemake rules and DVC stages.

A step's parameters come from `--params params.yaml` (the step's sections are
taken and validated) or, as the rules pass them, `--params-json` holding
exactly those sections. Errors caused by the input print one line naming the
culprit and exit with status 2; with `--log FILE` the step's own output goes
to FILE and the error line to both FILE and stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from pathgen.config import load_params, parse_step_params, step_params
from pathgen.errors import PathgenError, ReportError, SlideError

log = logging.getLogger("pathgen")
# Input errors of one slide: with on_slide_error quarantine they quarantine the slide, not fail the job.
SLIDE_INPUT_ERRORS = (SlideError, ReportError)


def _params(args: argparse.Namespace, step: str) -> dict[str, Any]:
    if args.params_json is not None:
        return parse_step_params(args.params_json, step)
    return step_params(load_params(args.params), step)


def _mpp(text: str | None) -> float | None:
    return float(text) if text not in (None, "", "None") else None


def _slide_step(args: argparse.Namespace, run: Callable[[], None], write_empty: Callable[[str], None]) -> None:
    """Run one slide step under its status record (pathgen.store.status).

    A quarantine recorded by an earlier step (`--after`) is passed on: the step writes its empty outputs
    without touching the slide. A slide input error quarantines the slide under `--on-slide-error
    quarantine` (empty outputs, the record, exit 0) and fails the step under `fail`.
    """
    from pathgen.store import status

    step = args.command
    upstream = status.upstream_quarantine(args.after)
    if upstream is not None:
        write_empty(upstream["reason"])
        if args.status:
            status.write_status(upstream, args.status)
        log.warning("%s %s: skipped, the slide was quarantined at %s", step, args.slide_id, upstream["step"])
        return
    try:
        run()
    except SLIDE_INPUT_ERRORS as exc:
        if args.on_slide_error != "quarantine" or not args.status:
            raise
        write_empty(str(exc))
        status.write_status(status.record(args.slide_id, step, str(exc)), args.status)
        _error_line(f"pathgen {step}: quarantined: {exc}")
        return
    if args.status:
        status.write_status(status.record(args.slide_id, step), args.status)


def cmd_tile(args: argparse.Namespace) -> None:
    from pathgen.steps.tile import run_tile, write_quarantined_tile

    params = _params(args, "tile")["tile"]

    def run() -> None:
        grid = run_tile(args.wsi, args.slide_id, params, args.grid, args.thumbnail, args.info, _mpp(args.mpp))
        log.info("tile %s: %d patches", args.slide_id, grid.height)
        if grid.height == 0:
            log.warning("tile %s: no tissue patches: the slide gives no pairs", args.slide_id)

    _slide_step(args, run, lambda reason: write_quarantined_tile(args.slide_id, reason, args.grid, args.thumbnail,
                                                                 args.info))


def cmd_embed(args: argparse.Namespace) -> None:
    from pathgen.steps.embed import run_embed, write_quarantined_embeddings

    params = _params(args, "embed")

    def run() -> None:
        features = run_embed(args.wsi, args.slide_id, args.grid, params["clip"], params["embed"], args.out,
                             _mpp(args.mpp), threads=args.threads, progress=not args.no_progress, readers=args.readers)
        log.info("embed %s: %d patches x %d dims", args.slide_id, *features.shape)

    _slide_step(args, run, lambda reason: write_quarantined_embeddings(args.slide_id, reason, args.out))


def cmd_prompts(args: argparse.Namespace) -> None:
    import polars as pl

    from pathgen.steps.prompts import PROMPT_SCHEMA, build_prompts, write_prompts

    params = _params(args, "prompts")["prompts"]

    def run() -> None:
        frame = build_prompts(args.slide_id, args.tissue, args.project or None, args.report or None, params,
                              cache_dir=args.cache_dir, flush_every=args.flush_every)
        write_prompts(frame, args.out)
        log.info("prompts %s: %d prompts", args.slide_id, frame.height)

    _slide_step(args, run, lambda reason: write_prompts(pl.DataFrame(schema=PROMPT_SCHEMA), args.out))


def cmd_select(args: argparse.Namespace) -> None:
    import json

    from pathgen.steps.select import run_select, write_quarantined_selection

    params = _params(args, "select")

    def run() -> None:
        info = json.loads(Path(args.info).read_text())
        counters: dict[str, Any] = {}
        selection = run_select(args.slide_id, args.embeddings, args.prompts, args.thumbnail, info, params,
                               args.out, args.overlay, cache_dir=args.cache_dir, flush_every=args.flush_every,
                               info=counters)
        log.info("select %s: %d rows, %d kept, left out by quality control: %s; text cache %s, model loaded: %s; "
                 "k-means on %s, %s iterations", args.slide_id, selection.height, int(selection["kept"].sum()),
                 counters.get("qc_excluded") or "none", counters.get("cache"), counters.get("clip_loaded"),
                 counters.get("kmeans_device"), counters.get("kmeans_iterations"))
        if args.stats:
            from pathgen.store.io import write_json

            write_json({"step": "select", "slide_id": args.slide_id, **counters}, args.stats)

    _slide_step(args, run, lambda reason: write_quarantined_selection(args.out, args.overlay))


def cmd_patches(args: argparse.Namespace) -> None:
    from pathgen.steps.patches import run_patches, write_quarantined_patches

    params = _params(args, "patches")["patches"]

    def run() -> None:
        count = run_patches(args.wsi, args.slide_id, args.selection, params, args.out, _mpp(args.mpp))
        log.info("patches %s: %d patches", args.slide_id, count)

    _slide_step(args, run, lambda reason: write_quarantined_patches(args.out))


def _shard_job(args: argparse.Namespace, step: str, run: Callable[..., dict[str, Any]]) -> None:
    """Run a model step for one shard and write its counters (cache, engine, items/s) to --stats."""
    import time

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    log_dir = Path(args.log).parent / f"{args.shard}.server" if args.log else None
    start = time.perf_counter()
    stats = run(threads=args.threads, log_dir=log_dir)
    seconds = time.perf_counter() - start
    stats = {**stats, "seconds": round(seconds, 3),
             "items_per_s": round(stats.get("items", 0) / seconds, 3) if seconds > 0 else None}
    log.info("%s %s: %s", step, args.shard, " ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    if args.stats:
        from pathgen.store.io import write_json

        write_json({"step": step, "shard": args.shard, **stats}, args.stats)


def cmd_caption(args: argparse.Namespace) -> None:
    import json

    from pathgen.steps.caption import run_caption

    settings = _params(args, "caption")["describe"]
    _shard_job(args, "caption", lambda **kw: run_caption(args.patches, json.loads(args.slides_json), settings,
                                                         args.cache_dir, args.flush_every, args.out, **kw))


def cmd_revise(args: argparse.Namespace) -> None:
    import json

    from pathgen.steps.revise import run_revise

    settings = _params(args, "revise")["revise"]
    _shard_job(args, "revise", lambda **kw: run_revise(args.patches, json.loads(args.slides_json), args.captions,
                                                       settings, args.cache_dir, args.flush_every, args.out, **kw))


def cmd_summarize(args: argparse.Namespace) -> None:
    from pathgen.steps.summarize import run_summarize

    settings = _params(args, "summarize")["summarize"]
    _shard_job(args, "summarize", lambda **kw: run_summarize(args.revised, settings, args.cache_dir,
                                                             args.flush_every, args.out, **kw))


def cmd_assemble_shard(args: argparse.Namespace) -> None:
    import json

    from pathgen.steps.assemble import assemble_shard
    from pathgen.store.manifest import SlideEntry

    params = _params(args, "assemble")
    slides = [SlideEntry(**entry) for entry in json.loads(args.slides_json)]
    counters: dict[str, Any] = {}
    part = assemble_shard(args.shard, slides, args.data_dir, args.out_dir, params, cache_dir=args.cache_dir,
                          flush_every=args.flush_every, info=counters)
    log.info("assemble %s: %d pairs, %d below assemble.min_clip_score; text cache %s, model loaded: %s",
             args.shard, part.height, counters.get("pairs_below_min_clip_score", 0), counters.get("cache"),
             counters.get("clip_loaded"))
    if args.stats:
        from pathgen.store.io import write_json

        write_json({"step": "assemble", "shard": args.shard, **counters}, args.stats)


def cmd_assemble(args: argparse.Namespace) -> None:
    from pathgen.steps.assemble import assemble_dataset

    incomplete = {}
    for item in args.incomplete:
        shard, sep, why = item.partition("=")
        if not sep or not why.strip():
            raise PathgenError(f"--incomplete {item!r}: expected SHARD=REASON")
        incomplete[shard] = why.strip()
    metrics = assemble_dataset(args.out_dir, args.shards, incomplete)
    log.info("assemble: %s", " ".join(f"{k}={v}" for k, v in sorted(metrics.items())))


def cmd_report_pages(args: argparse.Namespace) -> None:
    from pathgen.reporting.pages import write_report_pages

    paths = write_report_pages(args.dataset_dir, args.out_dir, args.n, args.seed, args.max_bytes or None)
    log.info("report-pages: %s", " ".join(str(p) for p in paths.values()))


def cmd_import_pathgen(args: argparse.Namespace) -> None:
    import json

    from pathgen.interop.importer import import_pathgen_json
    from pathgen.store.manifest import read_manifest

    slides = {entry.slide_id: Path(entry.path) for entry in read_manifest(args.manifest)}
    summary = import_pathgen_json(args.json, slides, args.out, patch_size=args.patch_size,
                                  jpeg_quality=args.jpeg_quality)
    print(json.dumps(summary, indent=2, sort_keys=True))


def cmd_manifest_gdc(args: argparse.Namespace) -> None:
    from pathgen.interop.gdc import gdc_manifest

    summary = gdc_manifest(args.sheet, args.slides_dir, args.out, reports=args.reports, reports_out=args.reports_out,
                           diagnostic_only=args.diagnostic_only, skip_missing=args.skip_missing,
                           project=args.project, force=args.force, append=args.append)
    print(summary.line())


def cmd_throughput(args: argparse.Namespace) -> None:
    import json

    from pathgen.reporting.throughput import format_throughput, step_throughput

    rows = step_throughput(args.logs)
    print(json.dumps(rows, indent=2, sort_keys=True) if args.json else format_throughput(rows))


def cmd_cache(args: argparse.Namespace) -> int | None:
    from pathgen.store import cache

    if args.action == "stats":
        print(cache.format_stats(cache.cache_stats(args.root)))
    elif args.action == "compact":
        print(cache.compact(args.root, agent=args.agent))
    elif args.action == "verify":
        report = cache.verify(args.root)
        for line in report["problems"]:
            print(f"pathgen cache verify: {line}", file=sys.stderr)
        print(f"pathgen cache verify: {report['segments']} segments, {report['items']} items checked against their "
              f"content hashes; {len(report['problems'])} problem(s)")
        return 1 if report["problems"] else 0
    else:
        removed = cache.prune(args.root, keep=args.keep, agent=args.agent, dry_run=args.dry_run)
        print("\n".join(str(p) for p in removed) or "nothing to prune")


def cmd_demo(args: argparse.Namespace) -> None:
    from pathgen.demo.slides import make_demo

    manifest = make_demo(Path(args.root), seed=args.seed, scale=args.scale)
    print(manifest)


def cmd_models(args: argparse.Namespace) -> None:
    from pathgen.demo.tiny_models import build_tiny_models

    for name, path in build_tiny_models(Path(args.out), seed=args.seed).items():
        print(f"{name}: {path}")


def cmd_validate(args: argparse.Namespace) -> int:
    from pathgen.store.manifest import read_manifest
    from pathgen.wsi.slide import Slide

    params = load_params(args.params)
    slides = read_manifest(params["manifest"])
    problems = []
    for entry in slides:
        try:
            with Slide(entry.path, entry.slide_id, entry.mpp):
                pass
        except SlideError as exc:
            problems.append(str(exc))
        if entry.report and not Path(entry.report).is_file():
            problems.append(f"report {entry.report} for slide '{entry.slide_id}': file not found")
    print(f"{args.params}: valid; {params['manifest']}: {len(slides)} slide(s)")
    if problems:
        for line in problems:
            print(f"pathgen validate: {line}", file=sys.stderr)
        action = "quarantined" if params["on_slide_error"] == "quarantine" else "failed"
        print(f"pathgen validate: {len(problems)} problem(s); a build runs the other slides, these are {action}",
              file=sys.stderr)
        return 2
    print(f"{params['manifest']}: every slide file opens")
    return 0


def cmd_dvc_yaml(args: argparse.Namespace) -> None:
    from pathgen.lineage.dvc_yaml import stale_lock_stages, write_dvc_yaml

    current = write_dvc_yaml(args.root, check=args.check)
    print("dvc.yaml: up to date" if current else "dvc.yaml: written")
    stale = stale_lock_stages(args.root)
    if stale:
        print(f"dvc.lock still records removed stage(s) {', '.join(stale)}: after the next build run "
              "`rm dvc.lock && dvc commit -f` (dvc commit alone keeps them)", file=sys.stderr)


def cmd_sync(args: argparse.Namespace) -> None:
    from pathgen.lineage.versioning import sync

    touched = sync(args.root)
    print(f"pathgen sync: dvc status is clean; Snakemake now takes {touched} output file(s) as up to date")


def cmd_audit(args: argparse.Namespace) -> int:
    from pathgen.lineage.versioning import audit, format_audit

    result = audit(args.repo, args.rev, keep=args.keep, remote=args.remote, mode=args.mode,
                   max_changed=args.max_changed)
    text = format_audit(result)
    print(text, file=sys.stdout if result.passed else sys.stderr)
    return 0 if result.passed else 1


def cmd_diff(args: argparse.Namespace) -> int:
    from pathgen.lineage.diff import run

    return run(args)


def _add_step_io(p: argparse.ArgumentParser, wsi: bool = True, slide: bool = True) -> None:
    if wsi:
        p.add_argument("wsi", help="whole-slide image file")
    if slide:
        p.add_argument("--slide-id", required=True)
    p.add_argument("--params", default="params.yaml", help="params.yaml to take this step's sections from")
    p.add_argument("--params-json", help="this step's params.yaml sections as JSON (as rules pass them)")
    p.add_argument("--log", help="write this step's log here")
    if slide:
        p.add_argument("--status", help="write the slide job's status record here (pathgen.store.status)")
        p.add_argument("--after", nargs="*", default=[], metavar="STATUS",
                       help="status records of the slide's earlier steps: a quarantine there is passed on")
        p.add_argument("--on-slide-error", choices=["quarantine", "fail"], default="fail",
                       help="an input error of the slide quarantines it (with --status) or fails the step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathgen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tile", help="segment tissue and lay the patch grid of one slide")
    _add_step_io(p)
    p.add_argument("--mpp", help="µm/px override from the manifest")
    p.add_argument("--grid", required=True, help="output tile grid (parquet)")
    p.add_argument("--thumbnail", required=True, help="output thumbnail with mask outline (PNG)")
    p.add_argument("--info", required=True, help="output slide info (JSON)")
    p.set_defaults(func=cmd_tile)

    p = sub.add_parser("embed", help="CLIP image features of a slide's tiles into Zarr")
    _add_step_io(p)
    p.add_argument("--mpp")
    p.add_argument("--grid", required=True, help="tile grid from `pathgen tile`")
    p.add_argument("--out", required=True, help="output embeddings store (.zarr directory)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--readers", type=int, default=None,
                   help="patch-reading processes besides the forward pass (default 2; changes no output byte)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("prompts", help="report and attribute retrieval prompts of one slide")
    _add_step_io(p, wsi=False)
    p.add_argument("--tissue", required=True)
    p.add_argument("--project", default="")
    p.add_argument("--report", default="", help="report text file (optional)")
    p.add_argument("--cache-dir", default="cache", help="item-level cache root (used with prompts.llm)")
    p.add_argument("--flush-every", type=int, default=32)
    p.add_argument("--out", required=True, help="output prompts (parquet)")
    p.set_defaults(func=cmd_prompts)

    p = sub.add_parser("select", help="representative patches: retrieval + k-means + near-duplicate filter")
    _add_step_io(p, wsi=False)
    p.add_argument("--embeddings", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--thumbnail", required=True, help="thumbnail from `pathgen tile`")
    p.add_argument("--info", required=True, help="slide info from `pathgen tile`")
    p.add_argument("--out", required=True, help="output selection (parquet)")
    p.add_argument("--overlay", required=True, help="output overlay (PNG)")
    p.add_argument("--cache-dir", default=None,
                   help="item-level cache root: prompt text features and the checkpoint hash store (default: none)")
    p.add_argument("--flush-every", type=int, default=32)
    p.add_argument("--stats", help="write the job's counters (text cache, model loaded, k-means) here (JSON)")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("patches", help="cut the kept patches of one slide into a tar of JPEGs")
    _add_step_io(p)
    p.add_argument("--mpp")
    p.add_argument("--selection", required=True)
    p.add_argument("--out", required=True, help="output tar")
    p.set_defaults(func=cmd_patches)

    def shard_step(name: str, help_text: str, patches: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        _add_step_io(p, wsi=False, slide=False)
        p.add_argument("--shard", required=True)
        if patches:
            p.add_argument("--slides-json", required=True, help="the shard's slides: [{slide_id, tissue, project}]")
            p.add_argument("--patches", nargs="+", required=True, help="the shard's per-slide patch tars")
        p.add_argument("--cache-dir", default="cache", help="item-level cache root")
        p.add_argument("--flush-every", type=int, default=32)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--out", required=True)
        p.add_argument("--stats", help="write the job's counters (items, cache hits and misses, model loaded, "
                                       "tokens, seconds, items/s) here as JSON")
        return p

    p = shard_step("caption", "describe every patch of a shard with the describe LMM")
    p.set_defaults(func=cmd_caption)
    p = shard_step("revise", "correct a shard's descriptions with the revise agent")
    p.add_argument("--captions", required=True)
    p.set_defaults(func=cmd_revise)
    p = shard_step("summarize", "condense a shard's revised descriptions to CLIP's context", patches=False)
    p.add_argument("--revised", required=True)
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("assemble-shard", help="pack a shard's pairs into a WebDataset tar and manifest part")
    _add_step_io(p, wsi=False, slide=False)
    p.add_argument("--shard", required=True)
    p.add_argument("--slides-json", required=True, help="the shard's manifest rows as JSON")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out-dir", default="data/dataset")
    p.add_argument("--cache-dir", default=None,
                   help="item-level cache root: summary text features and the checkpoint hash store (default: none)")
    p.add_argument("--flush-every", type=int, default=32)
    p.add_argument("--stats", help="write the job's counters (pairs, pairs below min_clip_score, text cache, "
                                   "model loaded) here (JSON)")
    p.set_defaults(func=cmd_assemble_shard)

    p = sub.add_parser("assemble", help="manifest, sizes.json, metrics, plots and export of the whole dataset")
    p.add_argument("--out-dir", default="data/dataset")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--incomplete", nargs="*", default=[], metavar="SHARD=REASON",
                   help="shards whose jobs did not complete: left out, named in failures.tsv and metrics.json")
    p.add_argument("--log")
    p.set_defaults(func=cmd_assemble)

    p = sub.add_parser("report-pages", help="sample-pairs and dataset-plots HTML pages for the Snakemake report")
    p.add_argument("--dataset-dir", default="data/dataset", help="the assembled dataset (manifest, shards, plots)")
    p.add_argument("--out-dir", required=True, help="where samples.html and plots.html go")
    p.add_argument("--n", type=int, default=12, help="number of sample pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample selection")
    p.add_argument("--max-bytes", type=int, default=1_500_000,
                   help="leave pairs out to keep samples.html under this size (0: no limit); the default fits "
                        "Chromium's limit for pages inside a Snakemake report")
    p.add_argument("--log")
    p.set_defaults(func=cmd_report_pages)

    p = sub.add_parser("import-pathgen", help="cut the pairs of a released PathGen-1.6M JSON from local slides")
    p.add_argument("json", help="the released JSON (wsi_id, position, caption, file_id)")
    p.add_argument("--manifest", default="data/slides.tsv", help="maps wsi_id (= slide_id) to local slide files")
    p.add_argument("--out", default="data/imported", help="one WebDataset tar per slide; resumable per slide")
    p.add_argument("--patch-size", type=int, default=672)
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.set_defaults(func=cmd_import_pathgen, log=None)

    p = sub.add_parser("manifest", help="write the slide manifest (data/slides.tsv) from a download")
    source = p.add_subparsers(dest="source", required=True)
    q = source.add_parser("gdc", help="from a GDC sample sheet (or gdc-client manifest) and the downloaded TCGA slides")
    q.add_argument("sheet", help="the GDC portal's sample sheet TSV, or the gdc-client manifest (id, filename, ...)")
    q.add_argument("--slides-dir", required=True,
                   help="where the slides were downloaded: <dir>/<file_id>/<file_name> (gdc-client) or flat")
    q.add_argument("--reports", help="reports: a folder of .txt files named by case barcode (TCGA-XX-XXXX...), "
                                     "or a CSV with columns patient_filename, text (TCGA-Reports)")
    q.add_argument("--reports-out", default="data/tcga-reports",
                   help="where reports from a CSV are written, one <case>.txt per case")
    q.add_argument("--out", default="data/slides.tsv")
    q.add_argument("--diagnostic-only", action="store_true", help="only diagnostic slides (DX; not frozen TS/BS/MS)")
    q.add_argument("--skip-missing", action="store_true", help="leave out slides not downloaded, with a warning")
    q.add_argument("--project", help="gdc-client manifest only: the TCGA project of its files (e.g. TCGA-COAD)")
    q.add_argument("--force", action="store_true", help="replace an existing manifest with other contents")
    q.add_argument("--append", action="store_true",
                   help="keep an existing manifest's rows (and so its shards) and add the new slides after them")
    q.set_defaults(func=cmd_manifest_gdc, log=None)

    p = sub.add_parser("cache", help="inspect and maintain the item-level cache")
    p.add_argument("action", choices=["stats", "compact", "prune", "verify"])
    p.add_argument("--root", default="cache")
    p.add_argument("--agent", help="only this agent (describe, revise, summarize, ...)")
    p.add_argument("--keep", nargs="*", default=[], help="prune: fingerprints to keep")
    p.add_argument("--dry-run", action="store_true", help="prune: list what would go")
    p.set_defaults(func=cmd_cache, log=None)

    p = sub.add_parser("demo", help="write the synthetic demo slides, reports and manifest")
    p.add_argument("--root", default=".", help="project root (writes data/demo/ and data/slides.tsv)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="<1 for smaller slides")
    p.set_defaults(func=cmd_demo, log=None)

    p = sub.add_parser("models", help="build offline models")
    p.add_argument("kind", choices=["tiny"], help="tiny: random-weight models with the real architectures")
    p.add_argument("--out", default="models")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_models, log=None)

    p = sub.add_parser("dvc-yaml", help="generate dvc.yaml (one DVC stage per step) from the Snakefile")
    p.add_argument("--root", default=".", help="project root (Snakefile, params.yaml, the manifest's inputs)")
    p.add_argument("--check", action="store_true", help="only compare; fail with a diff when dvc.yaml is stale")
    p.set_defaults(func=cmd_dvc_yaml, log=None)

    p = sub.add_parser("sync", help="after `dvc checkout`/`dvc pull`: mark Snakemake's outputs up to date "
                                    "(only when `dvc status` is clean)")
    p.add_argument("--root", default=".")
    p.set_defaults(func=cmd_sync, log=None)

    p = sub.add_parser("audit", help="rebuild a revision from its DVC-tracked inputs in a fresh clone; exact: "
                                     "model answers from the verified item cache, dvc.lock must come out "
                                     "byte-identical; recompute: every model call made again, judged by the "
                                     "dataset diff")
    p.add_argument("rev", nargs="?", default="HEAD")
    p.add_argument("--mode", choices=["exact", "recompute"], default="exact")
    p.add_argument("--max-changed", type=float, default=0.01,
                   help="recompute: the share of the committed pairs that may be added, removed or re-captioned "
                        "(default 0.01); a changed patch image always fails")
    p.add_argument("--repo", default=".")
    p.add_argument("--keep", help="build in this (empty) directory and keep it, instead of a temporary one")
    p.add_argument("--remote", help="pull the tracked inputs from this DVC remote instead of the local cache")
    p.set_defaults(func=cmd_audit, log=None)

    p = sub.add_parser("throughput", help="items/s, cache hits and token counts of the model steps' jobs")
    p.add_argument("--logs", default="logs", help="the run's log directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_throughput)

    p = sub.add_parser("diff", help="compare two versions of the dataset (pairs added, removed, caption changed)")
    p.add_argument("rev_a", nargs="?", default="HEAD", metavar="REV_A",
                   help="git revision of the old dataset (default: HEAD)")
    p.add_argument("rev_b", nargs="?", default=None, metavar="REV_B",
                   help="git revision of the new dataset (default: the workspace, committed or not)")
    p.add_argument("--repo", default=".", help="the git + DVC repository (default: .)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with the patches")
    p.add_argument("--examples", type=int, metavar="N", help="examples per kind of change (default: 5)")
    p.set_defaults(func=cmd_diff, log=None)

    p = sub.add_parser("validate", help="check params.yaml against its schema and read the manifest")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_validate, log=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    real_stderr, log_file = sys.stderr, None
    if getattr(args, "log", None):
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(args.log, "w", buffering=1)
        sys.stderr = log_file
    _OUTPUTS.append((real_stderr, log_file))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        status = func(args) or 0
    except PathgenError as exc:
        _error_line(f"pathgen {args.command}: error: {exc}")
        return 2
    finally:
        _OUTPUTS.pop()
        sys.stderr = real_stderr
        if log_file is not None:
            log_file.close()
    return status


# (the real stderr, the step's --log file or None) of each running `main` (tests call it in-process)
_OUTPUTS: list[tuple[Any, Any]] = []


def _error_line(line: str) -> None:
    """One line for the user: on the real stderr, and in the step's log file when there is one."""
    real, log_file = _OUTPUTS[-1] if _OUTPUTS else (sys.stderr, None)
    if log_file is not None:
        print(line, file=log_file, flush=True)
    print(line, file=real, flush=True)


if __name__ == "__main__":
    sys.exit(main())
