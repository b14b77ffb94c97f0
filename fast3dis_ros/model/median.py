"""Order statistics (lower medians, k-th smallest values) that export to ONNX opset 18 and to TensorRT.

``torch.onnx.export`` has no translation for ``aten.median.dim`` nor ``aten.nanmedian.dim``; both return
the *lower* median (element ``(n - 1) // 2`` of the sorted values) and so does this module;
``masked_lower_median`` takes the validity mask explicitly instead of encoding it as NaN.

Two implementations of the same values, picked by ``torch.compiler.is_exporting()``:

* eager / compiled PyTorch: ``sort`` + ``gather`` (one kernel each, no host synchronisation);
* graph export: `kth_smallest_by_bisection`, a selection without any sort. A sort exports as an ONNX
  ``TopK`` with k = the slice length, and TensorRT's TopK takes ``k <= 3840``: the scene-normalisation
  medians run over every patch point of a window (views x H/14 x W/14, 3888 from 4 views at 504x378),
  so a sort would make a robot-sized window impossible to build as an engine.

`kth_smallest_by_bisection` is exact for float32: it finds the k-th smallest *bit pattern* of the
magnitudes by a fixed 31-step bisection over the 31-bit key space (IEEE-754 orders non-negative floats
like their bit patterns), comparing the values with the float whose pattern is the candidate key. The
candidate float is decoded arithmetically (a power-of-two table times ``1 + M / 2**23``, both exact),
so the graph needs no bitcast, only compare / sum / where / gather on ``(..., n)`` tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Bits of the IEEE-754 float32 magnitude key: 8 exponent bits above 23 mantissa bits.
_MANTISSA_BITS = 23
_KEY_BITS = 31


def _pow2_table(device: torch.device) -> Tensor:
    """``2 ** (E - 127)`` for biased exponents ``E`` 0..255 in float32 (``E = 255`` -> inf, E = 0 unused)."""
    vals = [0.0] + [math.ldexp(1.0, e - 127) for e in range(1, 255)] + [math.inf]
    return torch.tensor(vals, dtype=torch.float32, device=device)


def _decode_magnitude(exponent: Tensor, mantissa: Tensor, pow2: Tensor) -> Tensor:
    """The non-negative float32 whose bit pattern is ``exponent << 23 | mantissa`` (exact; E=255 -> inf).

    Normal: ``2**(E-127) * (1 + M * 2**-23)``; subnormal (E = 0): ``M * 2**-23 * 2**-126``. Every
    product is of exactly representable factors with a representable result, so no rounding occurs."""
    frac = mantissa.to(torch.float32) * (2.0 ** -_MANTISSA_BITS)
    normal = pow2[exponent] * (1.0 + frac)
    subnormal = frac * (2.0 ** -126)
    return torch.where(exponent == 0, subnormal, normal)


def kth_smallest_by_bisection(x: Tensor, k: Tensor, dim: int) -> Tensor:
    """The ``k``-th smallest (0-based) of float32 ``x`` along ``dim``, without a sort; exact.

    ``x``: finite values or ``+inf`` (``-inf`` and NaN are not supported). ``k``: integer tensor of
    ``x``'s shape without ``dim`` (or a scalar), ``0 <= k < x.shape[dim]``. Equals
    ``x.sort(dim).values.gather(dim, k)`` except that -0.0 and +0.0 may come out swapped (they compare
    equal, so ``torch.equal`` holds).

    Negative values are handled by first choosing the sign: with ``n_neg`` negatives, ``k < n_neg``
    means the answer is the ``(n_neg - 1 - k)``-th smallest magnitude among the negatives, otherwise the
    ``(k - n_neg)``-th smallest among the rest. That magnitude's key is the largest ``t`` with
    ``#{|x| < decode(t)} <= k'``, found greedily bit by bit (31 fixed passes: the predicate is monotone
    in ``t``). Keys above +inf's decode to +inf, so an answer of +inf (e.g. a slice of padding) is kept.
    """
    x = x.movedim(dim, -1).to(torch.float32)
    k = torch.as_tensor(k, device=x.device).to(torch.int64).expand(x.shape[:-1])
    negative = x < 0
    n_neg = negative.sum(-1)
    in_negatives = k < n_neg
    k_mag = torch.where(in_negatives, n_neg - 1 - k, k - n_neg)
    chosen = negative == in_negatives[..., None]  # the negatives, or the rest (no Where on bool: ORT)
    magnitude = torch.where(chosen, x.abs(), torch.full_like(x, math.inf))

    pow2 = _pow2_table(x.device)
    exponent = torch.zeros(x.shape[:-1], dtype=torch.int64, device=x.device)
    mantissa = torch.zeros_like(exponent)
    for bit in range(_KEY_BITS - 1, -1, -1):
        if bit >= _MANTISSA_BITS:
            cand_e, cand_m = exponent + (1 << (bit - _MANTISSA_BITS)), mantissa
        else:
            cand_e, cand_m = exponent, mantissa + (1 << bit)
        below = (magnitude < _decode_magnitude(cand_e, cand_m, pow2)[..., None]).sum(-1)
        take = below <= k_mag
        exponent = torch.where(take, cand_e, exponent)
        mantissa = torch.where(take, cand_m, mantissa)
    value = _decode_magnitude(exponent, mantissa, pow2)
    return torch.where(in_negatives, -value, value)


def kth_smallest(x: Tensor, k: Tensor | int, dim: int) -> Tensor:
    """The ``k``-th smallest (0-based) along ``dim``; ``k`` as in `kth_smallest_by_bisection`.

    Sort + gather in PyTorch; `kth_smallest_by_bisection` (no ``TopK``) while a graph is exported."""
    if torch.compiler.is_exporting():
        return kth_smallest_by_bisection(x, torch.as_tensor(k, device=x.device), dim).to(x.dtype)
    ordered = x.sort(dim=dim).values
    if isinstance(k, int):
        return ordered.narrow(dim, k, 1).squeeze(dim)
    return ordered.gather(dim, k.unsqueeze(dim)).squeeze(dim)


def order_statistics(x: Tensor, ranks: list[int], dim: int = -1) -> list[Tensor]:
    """``[k-th smallest of x along dim for k in ranks]``: one sort in PyTorch, one selection per rank
    (no ``TopK``) while a graph is exported."""
    if torch.compiler.is_exporting():
        return [kth_smallest(x, k, dim) for k in ranks]
    ordered = x.sort(dim=dim).values
    return [ordered.select(dim, k) for k in ranks]


def masked_lower_median(x: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Lower median of ``x`` over the entries where ``valid`` (same shape) along ``dim``.

    Equals ``torch.nanmedian(torch.where(valid, x, nan), dim).values`` whenever at least one entry is
    valid and the valid entries are finite; a slice without a valid entry gives ``+inf`` (callers
    replace it). Invalid entries count as ``+inf`` (last); the median index counts valid ones only.
    """
    filled = torch.where(valid, x, torch.full_like(x, float("inf")))
    n = valid.sum(dim=dim)
    idx = torch.div((n - 1).clamp_min(0), 2, rounding_mode="floor")
    return kth_smallest(filled, idx, dim)


def lower_median(x: Tensor, dim: int) -> Tensor:
    """``torch.median(x, dim).values`` for finite ``x`` (the lower median), exportable."""
    return kth_smallest(x, (x.shape[dim] - 1) // 2, dim)
