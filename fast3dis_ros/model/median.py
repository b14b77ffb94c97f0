"""Lower medians by sort + gather: the same values as ``torch.median`` / ``torch.nanmedian`` along a dim,
built from ops that export to ONNX opset 18 (``Sort`` -> ``TopK``, ``GatherElements``).

``torch.onnx.export`` has no translation for ``aten.median.dim`` nor ``aten.nanmedian.dim``. Both return the
*lower* median (element ``(n - 1) // 2`` of the sorted values) and so does this; ``masked_lower_median``
takes the validity mask explicitly instead of encoding it as NaN. No host synchronisation either way.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_lower_median(x: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Lower median of ``x`` over the entries where ``valid`` (same shape) along ``dim``.

    Equals ``torch.nanmedian(torch.where(valid, x, nan), dim).values`` whenever at least one entry is
    valid and the valid entries are finite; a slice without a valid entry gives ``+inf`` (callers
    replace it). Invalid entries are sorted last as ``+inf``; the median index counts valid ones only.
    """
    filled = torch.where(valid, x, torch.full_like(x, float("inf")))
    ordered = filled.sort(dim=dim).values
    n = valid.sum(dim=dim, keepdim=True)
    idx = torch.div((n - 1).clamp_min(0), 2, rounding_mode="floor")
    return ordered.gather(dim, idx).squeeze(dim)


def lower_median(x: Tensor, dim: int) -> Tensor:
    """``torch.median(x, dim).values`` for finite ``x`` (the lower median), exportable."""
    ordered = x.sort(dim=dim).values
    return ordered.narrow(dim, (x.shape[dim] - 1) // 2, 1).squeeze(dim)
