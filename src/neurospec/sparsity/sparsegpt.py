"""SparseGPT: optimal-brain-surgeon pruning with a calibration Hessian, column by column.

With ``H = (2/N) sum_t x_t x_t^T`` (:class:`~neurospec.sparsity.stats.InputHessian`):

1. dead inputs (``H_jj == 0``) get ``H_jj = 1`` and their weight column is zeroed;
2. ``H += damp * mean(diag H) * I``;
3. ``U`` = the upper Cholesky factor of ``H^-1``. Row ``j`` of ``U`` is row ``j`` of the inverse Hessian of the
   columns ``j..in-1`` divided by the square root of its diagonal, so the OBS step for column ``j`` is
   ``err = w_j / U_jj`` (for pruned weights), ``w_{j:} -= err * U_{j, j:}``;
4. columns go left to right in blocks of ``blocksize``. Unstructured: at the start of each block the mask takes the
   ``int(rows * block_cols * sparsity)`` lowest ``w^2 / U_jj^2`` of the block (one threshold over the block);
   N:M: at every M-th column the N lowest of the next M columns of each row. OBS updates run inside the block;
   the block's accumulated errors update the columns to its right in one matrix product (the lazy batch update).

The reference thresholds with ``<=`` at the sorted position ``int(numel * sparsity)``, pruning one weight more per
block; here exactly ``int(numel * sparsity)`` go, so ``sparsity=0`` prunes nothing.
"""

from __future__ import annotations

import torch

from neurospec.sparsity.patterns import SparsityError, SparsityPattern, lowest_overall, lowest_per_group
from neurospec.sparsity.registry import LayerResult, PruningMethod, register_method


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the damped ``H^-1`` (float64) and the dead-input mask."""
    H = hessian.detach().to(torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError:
        raise SparsityError(
            "the calibration Hessian is not positive definite even after dampening: use more calibration tokens "
            f"(at least the layer's input width, {H.shape[0]}) or a larger damp (now {damp})"
        ) from None
    return U, dead


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    dtype: torch.dtype | None = None,
) -> LayerResult:
    """Prune ``weight [out, in]`` with the Hessian ``hessian [in, in]`` (module docstring).

    ``dtype``: of the sweep (default float32, float64 when the weight is float64); the Cholesky factorisations
    always run in float64. Cost: ``O(in^3 + out * in^2)``; memory ``in^2 + 2 out * in`` floats.
    """
    if not isinstance(blocksize, int) or blocksize < 1:
        raise SparsityError(f"blocksize must be a positive integer, got {blocksize!r}")
    if not damp > 0:
        raise SparsityError(f"damp must be positive (a fraction of the mean Hessian diagonal), got {damp!r}")
    if pattern.structured and blocksize % pattern.m:
        raise SparsityError(f"blocksize {blocksize} must be a multiple of the N:M group size {pattern.m}")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise SparsityError(f"Hessian of shape {tuple(hessian.shape)} does not match a weight with {cols} inputs")
    dtype = dtype or (torch.float64 if weight.dtype == torch.float64 else torch.float32)
    # The sweep works on the transpose [in, out], so that a column of W and the columns right of it are contiguous.
    Wt = weight.detach().t().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    U64, dead = inverse_hessian_factor(hessian.to(Wt.device), damp)
    U = U64.to(dtype)
    Wt[dead] = 0
    pruned_t = torch.zeros(cols, rows, dtype=torch.bool, device=Wt.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        width = i2 - i1
        W1 = Wt[i1:i2]  # a view: updated in place
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        err = torch.empty(width, rows, dtype=dtype, device=Wt.device)
        if pattern.structured:
            mask = pruned_t[i1:i2]
        else:
            mask = lowest_overall(W1.square() / d.square()[:, None], int(rows * width * pattern.sparsity))
        for i in range(width):
            if pattern.structured and i % pattern.m == 0:
                j = i + pattern.m
                score = (W1[i:j].square() / d[i:j].square()[:, None]).t()
                mask[i:j] = lowest_per_group(score, pattern.n, pattern.m).t()
            e = torch.where(mask[i], W1[i], 0).div_(d[i])
            W1[i + 1 :].addr_(U1[i, i + 1 :], e, alpha=-1)
            W1[i].masked_fill_(mask[i], 0)
            err[i] = e
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), err, alpha=-1)
        pruned_t[i1:i2] = mask
    W = Wt.t()
    pruned = pruned_t.t().contiguous()
    pruned |= dead[None, :]
    return LayerResult(W.to(weight.dtype).contiguous(), pruned)


register_method(
    PruningMethod(
        "sparsegpt", sparsegpt, "hessian", True, "OBS updates with the calibration Hessian (blocks of 128 columns)",
        options=("blocksize", "damp", "dtype"), min_tokens=lambda width: width,
    )
)
