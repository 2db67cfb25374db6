"""Which torch device a model runs on."""

from __future__ import annotations

import torch

from pathgen.errors import ModelError


def resolve_device(name: str, setting: str = "embed.device") -> torch.device:
    """'auto' picks CUDA when present, else CPU; `setting` names the params.yaml key in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"params.yaml {setting} is '{name}' but no CUDA device is available")
    return torch.device(name)
