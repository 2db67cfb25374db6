"""Random weights that are the same bits on every CPU.

torch's CPU initialisers (`normal_`, `uniform_`, `trunc_normal_`) run kernels chosen by the
machine's instruction set (ATen's `ATEN_CPU_CAPABILITY`: scalar, AVX2 or AVX-512 Box-Muller and
transcendental functions), so one seed gives different low bits on different machines, and a
tiny model built on one machine is not the model built on another (measured: the tiny LLaVA
differed between `default` and `avx2`).

`redraw_parameters` keeps what torch's init decides about the architecture (which parameters are
constant, e.g. LayerNorm weights 1 and biases 0, and each random parameter's scale) and replaces
the random values with values made from integers only: PCG64 integers from numpy (an integer
algorithm, the same stream on every machine for one numpy version), mapped to a uniform
distribution with the same standard deviation by exact float64 operations and one correctly
rounded cast to the parameter's dtype. The scale is the standard deviation of torch's draw,
rounded to two significant digits, so the low bits of torch's draw never reach the result.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCALE_DIGITS = 2  # significant digits kept of each parameter's initial standard deviation
_BITS = 24  # uniform grid: 2**24 values, exact in float64


def rounded_std(values: torch.Tensor) -> float:
    """The standard deviation of `values` (float64), rounded to `SCALE_DIGITS` significant digits."""
    std = float(values.detach().double().std(unbiased=False))
    return float(f"{std:.{SCALE_DIGITS}g}") if std > 0 else 0.0


def portable_uniform(shape: tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """Float64 values uniform on [-√3·std, √3·std] (standard deviation `std`) from integer draws.

    Integers k in [0, 2^24) become (2k + 1 - 2^24) / 2^24, exactly; the one multiplication by
    √3·std and the later cast are correctly rounded IEEE operations, the same on every CPU.
    """
    k = rng.integers(0, 1 << _BITS, size=shape, dtype=np.int64)
    unit = (2 * k + 1 - (1 << _BITS)).astype(np.float64) / float(1 << _BITS)  # in (-1, 1), exact
    return unit * (math.sqrt(3.0) * std)


@torch.no_grad()
def redraw_parameters(model: torch.nn.Module, seed: int) -> int:
    """Replace every non-constant parameter of `model` with portable values of the same scale, in
    place, in the order of `named_parameters()`; return how many were redrawn."""
    rng = np.random.default_rng(seed)
    redrawn = 0
    for _, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        if flat.numel() == 0 or bool((flat == flat[0]).all()):
            continue  # constant (ones, zeros, a fixed scalar such as CLIP's logit scale): exact already
        values = portable_uniform(tuple(param.shape), rounded_std(param), rng)
        param.copy_(torch.from_numpy(values).to(param.dtype))
        redrawn += 1
    return redrawn
