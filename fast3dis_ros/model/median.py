"""Order statistics (lower medians, k-th smallest values) that export to ONNX opset 18 and to TensorRT.

``torch.onnx.export`` has no translation for ``aten.median.dim`` nor ``aten.nanmedian.dim``; both return
the *lower* median (element ``(n - 1) // 2`` of the sorted values) and so does this module;
``masked_lower_median`` takes the validity mask explicitly instead of encoding it as NaN.

Two implementations of the same values, picked by ``torch.compiler.is_exporting()``:

* eager / compiled PyTorch: ``sort`` + ``gather`` (one kernel each, no host synchronisation);
* graph export: `kth_smallest_by_radix_select`, a selection without any sort. A sort exports as an ONNX
  ``TopK`` with k = the slice length, and TensorRT's TopK takes ``k <= 3840``: the scene-normalisation
  medians run over every patch point of a window (views x H/14 x W/14, 3888 from 4 views at 504x378),
  so a sort would make a robot-sized window impossible to build as an engine (the anchor statistics'
  quantiles, `order_statistics`, cross the limit from 16 views).

`kth_smallest_by_radix_select` is exact for float32: it finds the k-th smallest *bit pattern* of the
magnitudes one radix-16 digit at a time, 8 fixed passes over the 31-bit key space (IEEE-754 orders
non-negative floats like their bit patterns), comparing the values with the floats whose patterns are
the candidate keys. Those are decoded arithmetically (a power-of-two table times ``1 + M / 2**23``, both
exact), so the graph needs no bitcast, only compare / sum / where / gather.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: The float32 magnitude key: 8 exponent bits above 23 mantissa bits (31 bits; the sign is handled apart).
_MANTISSA_BITS = 23
#: Radix-16 digits of the key, most significant first: (shift, digit values). 3 + 7 x 4 = 31 bits.
_DIGITS = [(28, 8)] + [(shift, 16) for shift in range(24, -1, -4)]


def _pow2_table(device: torch.device) -> Tensor:
    """``2 ** (E - 127)`` for biased exponents ``E`` 0..255 in float32 (``E = 255`` -> inf, E = 0 unused)."""
    vals = [0.0] + [math.ldexp(1.0, e - 127) for e in range(1, 255)] + [math.inf]
    return torch.tensor(vals, dtype=torch.float32, device=device)


def _decode_magnitude(key: Tensor, pow2: Tensor) -> Tensor:
    """The non-negative float32 whose bit pattern is the int32 ``key`` (exact; exponent 255 -> inf).

    Normal: ``2**(E-127) * (1 + M * 2**-23)``; subnormal (E = 0): ``M * 2**-23 * 2**-126``. Every
    product is of exactly representable factors with a representable result, so no rounding occurs."""
    exponent = torch.div(key, 1 << _MANTISSA_BITS, rounding_mode="floor")
    frac = (key - exponent * (1 << _MANTISSA_BITS)).to(torch.float32) * (2.0 ** -_MANTISSA_BITS)
    normal = pow2[exponent.to(torch.int64)] * (1.0 + frac)  # int64: ONNX Gather(ND) indices
    subnormal = frac * (2.0 ** -126)
    return torch.where(exponent == 0, subnormal, normal)


def kth_smallest_by_radix_select(x: Tensor, k: Tensor, dim: int) -> Tensor:
    """The ``k``-th smallest (0-based) of ``x`` along ``dim``, without a sort; exact in float32.

    ``x``: finite values or ``+inf`` (``-inf`` and NaN are not supported), float32 or narrower. ``k``:
    integer tensor broadcastable to ``x``'s shape without ``dim`` (a scalar, or one rank per slice; extra
    leading dims select several ranks at once), ``0 <= k < x.shape[dim]``. Equals
    ``x.sort(dim).values.gather(dim, k)`` except that -0.0 and +0.0 may come out swapped (they compare
    equal, so ``torch.equal`` holds).

    Negative values are handled by first choosing the sign: with ``n_neg`` negatives, ``k < n_neg``
    means the answer is the ``(n_neg - 1 - k)``-th smallest magnitude among the negatives, otherwise the
    ``(k - n_neg)``-th smallest among the rest. That magnitude's key is the largest ``t`` with
    ``#{|x| < decode(t)} <= k'`` (the count is monotone in ``t``), found one radix-16 digit at a time: 8
    fixed passes, each counting against the 15 (7 for the top digit) candidate values of its digit. Keys
    above +inf's decode to +inf, so an answer of +inf (e.g. a slice of padding) is kept.
    """
    x = x.movedim(dim, -1).to(torch.float32)
    k = torch.as_tensor(k, device=x.device).to(torch.int64)
    lead = torch.broadcast_shapes(k.shape, x.shape[:-1])
    x = x.expand(*lead, x.shape[-1])
    k = k.expand(lead)
    negative = x < 0
    n_neg = negative.sum(-1)
    in_negatives = k < n_neg
    k_mag = torch.where(in_negatives, n_neg - 1 - k, k - n_neg)
    chosen = negative == in_negatives[..., None]  # the negatives, or the rest (no Where on bool: ORT)
    magnitude = torch.where(chosen, x.abs(), torch.full_like(x, math.inf))

    pow2 = _pow2_table(x.device)
    key = torch.zeros(lead, dtype=torch.int32, device=x.device)
    for shift, values in _DIGITS:
        steps = torch.arange(1, values, dtype=torch.int32, device=x.device) * (1 << shift)
        candidates = _decode_magnitude(key[..., None] + steps, pow2)  # (..., values - 1), ascending
        below = (magnitude[..., None, :] < candidates[..., :, None]).sum(-1)  # (..., values - 1)
        digit = (below <= k_mag[..., None]).sum(-1)  # how many candidates keep the count <= k'
        key = key + digit.to(torch.int32) * (1 << shift)
    value = _decode_magnitude(key, pow2)
    return torch.where(in_negatives, -value, value)


def kth_smallest(x: Tensor, k: Tensor | int, dim: int) -> Tensor:
    """The ``k``-th smallest (0-based) along ``dim``; ``k`` as in `kth_smallest_by_radix_select`.

    Sort + gather in PyTorch; `kth_smallest_by_radix_select` (no ``TopK``) while a graph is exported."""
    if torch.compiler.is_exporting():
        return kth_smallest_by_radix_select(x, torch.as_tensor(k, device=x.device), dim).to(x.dtype)
    ordered = x.sort(dim=dim).values
    if isinstance(k, int):
        return ordered.narrow(dim, k, 1).squeeze(dim)
    return ordered.gather(dim, k.unsqueeze(dim)).squeeze(dim)


def order_statistics(x: Tensor, ranks: list[int], dim: int = -1) -> list[Tensor]:
    """``[k-th smallest of x along dim for k in ranks]``: one sort in PyTorch, one radix selection for
    all ranks at once (no ``TopK``) while a graph is exported."""
    if torch.compiler.is_exporting():
        k = torch.tensor(ranks, device=x.device).view([len(ranks)] + [1] * (x.dim() - 1))
        return list(kth_smallest_by_radix_select(x, k, dim).to(x.dtype).unbind(0))
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
