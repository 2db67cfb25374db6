"""Tiny offline models with the real architectures, built deterministically from a seed.

They stand in for the released checkpoints (PathGen-CLIP-L_init, ...) so the
whole pipeline runs on a laptop and in CI through the same loading code.
Outputs are meaningless; shapes, file formats and code paths are real.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import open_clip
import torch

from pathgen.io import write_bytes, write_text

TINY_CLIP_NAME = "pathgen-tiny-clip"
# A ViT and text transformer of the ViT-L-14-336 family, shrunk: same 336 px
# input, quick GELU, 77-token context and CLIP BPE vocabulary.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 336, "layers": 2, "width": 64, "head_width": 32, "patch_size": 28, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}


def _write_if_changed(data: bytes, path: Path) -> None:
    # Unchanged bytes keep their mtime, so Snakemake and DVC see no change.
    if path.is_file() and path.read_bytes() == data:
        return
    write_bytes(data, path)


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write `pathgen-tiny-clip.json` (the open_clip config) and `open_clip_model.pt` for the tiny CLIP; return the checkpoint path."""
    out_dir = Path(out_dir)
    config_path = out_dir / f"{TINY_CLIP_NAME}.json"
    _write_if_changed((json.dumps(TINY_CLIP_CONFIG, indent=2, sort_keys=True) + "\n").encode(), config_path)
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None, force_quick_gelu=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    checkpoint = out_dir / "open_clip_model.pt"
    _write_if_changed(buf.getvalue(), checkpoint)
    write_text(
        "Tiny random-weight open_clip model (architecture of ViT-L-14-336, shrunk), "
        f"built offline by `pathgen models tiny` with seed {seed}. Not a trained model.\n",
        out_dir / "README.txt",
    ) if not (out_dir / "README.txt").is_file() else None
    return checkpoint
