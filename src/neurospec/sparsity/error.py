"""Per-neuron relative output error of a pruned linear layer.

For output row (neuron) ``o`` with dense weights ``w_o`` and pruned weights ``w'_o``, over tokens ``x_t``:
``e_o = ||(w_o - w'_o) X|| / ||w_o X|| = sqrt(d_o S d_o^T / w_o S w_o^T)`` with ``d_o = w_o - w'_o`` and the
input second moment ``S = sum_t x_t x_t^T``, so the error streams over any number of tokens in ``in x in`` memory.
A row whose dense output is zero on every token has error NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from neurospec.errors import NeurospecError
from neurospec.models.linear import weight_out_in
from neurospec.models.loading import LoadedModel
from neurospec.sparsity.driver import list_linears
from neurospec.sparsity.stats import InputHessian


def relative_output_error(
    dense_weight: torch.Tensor,
    sparse_weight: torch.Tensor,
    inputs: torch.Tensor | None = None,
    *,
    second_moment: torch.Tensor | None = None,
) -> torch.Tensor:
    """``FloatTensor[out]`` (float64): ``||W x - W' x|| / ||W x||`` per output row over the tokens of ``inputs``
    (``[tokens, in]``) or from their ``second_moment`` (``sum_t x_t x_t^T``); give exactly one of the two."""
    if (inputs is None) == (second_moment is None):
        raise NeurospecError("give either inputs [tokens, in] or their second moment [in, in], not both or neither")
    if dense_weight.shape != sparse_weight.shape or dense_weight.dim() != 2:
        raise NeurospecError(
            f"dense and sparse weights must be [out, in] of one shape, got {tuple(dense_weight.shape)} and "
            f"{tuple(sparse_weight.shape)}"
        )
    if second_moment is None:
        acc = InputHessian()
        acc.update(inputs.to(torch.float64))
        second_moment = acc.second_moment()
    S = second_moment.to(torch.float64)
    W = dense_weight.detach().to(S.device, torch.float64)
    D = W - sparse_weight.detach().to(S.device, torch.float64)
    num = ((D @ S) * D).sum(1).clamp_min(0)
    den = ((W @ S) * W).sum(1).clamp_min(0)
    return num.sqrt() / den.sqrt()


@torch.no_grad()
def neuron_output_error(
    dense: nn.Module | LoadedModel,
    sparse: nn.Module | LoadedModel,
    blocks: torch.Tensor,
    *,
    names: Sequence[str] | None = None,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """``{module name: FloatTensor[out]}``: the relative output error of each pruned linear module on held-out
    ``blocks`` (``LongTensor[n, seq]``), with the inputs the *dense* model gives that module (the layer's own error,
    not the error accumulated from earlier pruned layers). ``names``: module names as in
    :func:`~neurospec.sparsity.driver.list_linears`; default: every module whose weights differ."""
    dense = dense.model if isinstance(dense, LoadedModel) else dense
    sparse = sparse.model if isinstance(sparse, LoadedModel) else sparse
    d_lin, s_lin = list_linears(dense), list_linears(sparse)
    if names is None:
        names = [n for n in d_lin if n in s_lin and not torch.equal(weight_out_in(d_lin[n].module),
                                                                       weight_out_in(s_lin[n].module))]
    for n in names:
        if n not in d_lin or n not in s_lin:
            raise NeurospecError(f"no linear module {n!r} in both models; they have names like {list(d_lin)[:3]}")
    accs: dict[str, InputHessian] = {}
    handles = []
    for n in names:
        def hook(mod, args, name=n):
            accs.setdefault(name, InputHessian()).update(args[0].to(torch.float64))
        handles.append(d_lin[n].module.register_forward_pre_hook(hook))
    key = "pixel_values" if blocks.is_floating_point() else "input_ids"
    device = next(dense.parameters()).device
    try:
        for i in range(0, blocks.shape[0], batch_size):
            dense(**{key: blocks[i : i + batch_size].to(device)})
    finally:
        for h in handles:
            h.remove()
    return {
        n: relative_output_error(weight_out_in(d_lin[n].module), weight_out_in(s_lin[n].module),
                                 second_moment=accs[n].second_moment())
        for n in names
    }
