"""Per-layer sparsity methods against brute-force references: SparseGPT against a slow OBS loop, Wanda against a
per-row sort, magnitude against a sort of the whole matrix; N:M patterns, statistics, registry and errors."""

import pytest
import torch

from neurospec.errors import NeurospecError
from neurospec.sparsity import (
    InputHessian,
    InputNorms,
    PruningMethod,
    make_pattern,
    methods,
    prune_weight,
    register_method,
)
from neurospec.sparsity.sparsegpt import sparsegpt

ROWS, COLS = 6, 16


def problem(seed=0, dead=(3,), tokens=64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(ROWS, COLS, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, COLS, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, COLS, dtype=torch.float64)
    X[:, list(dead)] = 0
    acc = InputHessian()
    acc.update(X)
    return W, X, acc.compute()


def slow_obs(W, H, pattern, mask_block, damp=0.01):
    """Sequential OBS written directly: for each column q in order, pick the mask (per block of `mask_block` columns
    for unstructured, every M columns for N:M) from w^2 / [inv(H_FF)]_qq, then for each pruned weight of column q,
    w_F <- w_F - (w_q / [inv(H_FF)]_qq) inv(H_FF)[:, q] over the remaining columns F = {q, ..., cols-1}, with
    inv(H_FF) recomputed by brute force."""
    W, H = W.clone(), H.clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    for j in torch.nonzero(dead).flatten().tolist():
        H[j, j] = 1.0
    W[:, dead] = 0
    H = H + damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)

    def diag_inv(j):
        return torch.linalg.inv(H[j:, j:])[0, 0]

    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for q in range(cols):
        if not pattern.structured and q % mask_block == 0:
            cols_blk = list(range(q, min(q + mask_block, cols)))
            entries = sorted((float(W[r, j] ** 2 / diag_inv(j)), r, j) for r in range(rows) for j in cols_blk)
            for _, r, j in entries[: int(rows * len(cols_blk) * pattern.sparsity)]:
                pruned[r, j] = True
        if pattern.structured and q % pattern.m == 0:
            for r in range(rows):
                group = sorted((float(W[r, j] ** 2 / diag_inv(j)), j) for j in range(q, q + pattern.m))
                for _, j in group[: pattern.n]:
                    pruned[r, j] = True
        Hinv = torch.linalg.inv(H[q:, q:])
        for r in range(rows):
            if pruned[r, q]:
                W[r, q:] -= W[r, q] / Hinv[0, 0] * Hinv[:, 0]
                W[r, q] = 0.0
    return W, pruned | dead[None, :]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_equals_slow_obs_with_one_block(pattern):
    W, _, H = problem()
    pat = make_pattern(0.5 if pattern == "unstructured" else None, pattern)
    res = sparsegpt(W, H, pat, blocksize=COLS)
    ref_w, ref_mask = slow_obs(W, H, pat, mask_block=COLS)
    assert torch.equal(res.pruned, ref_mask)
    torch.testing.assert_close(res.weight, ref_w, atol=1e-5, rtol=0)
    assert (res.weight[res.pruned] == 0).all()


def test_sparsegpt_blocked_lazy_update_equals_unblocked():
    W, _, H = problem(seed=1)
    nm = make_pattern(None, "2:4")
    one = sparsegpt(W, H, nm, blocksize=COLS)
    for bs in (4, 8):  # the N:M mask does not depend on the block size: only the lazy update path differs
        blocked = sparsegpt(W, H, nm, blocksize=bs)
        assert torch.equal(blocked.pruned, one.pruned)
        torch.testing.assert_close(blocked.weight, one.weight, atol=1e-10, rtol=0)
    # unstructured: the mask is chosen per block, so compare with the slow loop choosing it per block too
    pat = make_pattern(0.5)
    blocked = sparsegpt(W, H, pat, blocksize=8)
    ref_w, ref_mask = slow_obs(W, H, pat, mask_block=8)
    assert torch.equal(blocked.pruned, ref_mask)
    torch.testing.assert_close(blocked.weight, ref_w, atol=1e-5, rtol=0)


def test_sparsegpt_dead_inputs_are_zeroed_and_never_updated():
    W, _, H = problem(dead=(3, 10))
    res = sparsegpt(W, H, make_pattern(0.25), blocksize=8)
    assert (res.weight[:, [3, 10]] == 0).all() and res.pruned[:, [3, 10]].all()
    assert not torch.isnan(res.weight).any()


def test_sparsegpt_float32_sweep_close_to_float64():
    W, _, H = problem(seed=2)
    a = sparsegpt(W, H, make_pattern(None, "2:4"), blocksize=8)
    b = sparsegpt(W.float(), H, make_pattern(None, "2:4"), blocksize=8)
    assert b.weight.dtype == torch.float32
    assert torch.equal(a.pruned, b.pruned)
    torch.testing.assert_close(b.weight.double(), a.weight, atol=1e-4, rtol=1e-4)


def test_wanda_equals_per_row_sort():
    W, X, _ = problem(seed=3, dead=())
    norms = InputNorms()
    norms.update(X)
    res = prune_weight("wanda", W, norms.compute(), make_pattern(0.4))
    k = int(COLS * 0.4)
    for r in range(ROWS):
        score = [abs(float(W[r, j])) * float(X[:, j].norm()) for j in range(COLS)]
        lowest = sorted(range(COLS), key=lambda j: score[j])[:k]
        assert res.pruned[r].nonzero().flatten().tolist() == sorted(lowest)
    assert torch.equal(res.weight, W.masked_fill(res.pruned, 0))


def test_magnitude_uses_one_threshold_per_matrix():
    W, _, _ = problem(seed=4)
    res = prune_weight("magnitude", W, None, make_pattern(0.3))
    k = int(W.numel() * 0.3)
    entries = sorted((abs(float(W[r, j])), r, j) for r in range(ROWS) for j in range(COLS))
    expected = torch.zeros_like(res.pruned)
    for _, r, j in entries[:k]:
        expected[r, j] = True
    assert torch.equal(res.pruned, expected)
    assert res.pruned.sum(1).unique().numel() > 1  # not a per-row choice


@pytest.mark.parametrize("name", sorted(methods()))
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_masks_prune_exactly_n_of_every_m(name, pattern):
    W, X, H = problem(seed=5, dead=())
    stat = {"none": None, "norms": X.norm(dim=0), "hessian": H}[methods()[name].stats]
    pat = make_pattern(None, pattern)
    res = prune_weight(name, W, stat, pat)
    groups = res.pruned.reshape(ROWS, COLS // pat.m, pat.m)
    assert (groups.sum(-1) == pat.n).all()
    assert (res.weight[res.pruned] == 0).all() and (res.weight[~res.pruned] != 0).all()
    assert res.sparsity == pytest.approx(pat.n / pat.m)


def test_rows_subset_leaves_other_rows_unchanged():
    W, X, H = problem(seed=6)
    res = prune_weight("sparsegpt", W, H, make_pattern(0.5), rows=[1, 4], blocksize=COLS)
    full = prune_weight("sparsegpt", W[[1, 4]], H, make_pattern(0.5), blocksize=COLS)
    keep = [0, 2, 3, 5]
    assert torch.equal(res.weight[keep], W[keep]) and not res.pruned[keep].any()
    torch.testing.assert_close(res.weight[[1, 4]], full.weight)


def test_stats_stream_and_merge_equal_the_full_tensor():
    _, X, _ = problem(seed=7, dead=())
    a, b, whole = InputHessian(), InputHessian(), InputHessian()
    a.update(X[:20])
    b.update(X[20:].reshape(4, -1, COLS))  # leading dimensions are flattened
    whole.update(X)
    torch.testing.assert_close(a.merge(b).compute(), 2 / X.shape[0] * X.T @ X)
    torch.testing.assert_close(whole.compute(), a.compute())
    n = InputNorms()
    n.update(X.float())
    torch.testing.assert_close(n.compute(), X.norm(dim=0), rtol=1e-6, atol=1e-6)
    assert n.sum.dtype == torch.float64


def test_registry_rejects_duplicates_and_unknown_names():
    m = methods()["magnitude"]
    with pytest.raises(ValueError, match="already registered"):
        register_method(PruningMethod("magnitude", m.prune, "none", False, "again"))
    with pytest.raises(NeurospecError, match="unknown pruning method 'obs'.*magnitude"):
        prune_weight("obs", torch.zeros(2, 4), None, make_pattern(0.5))
    assert {"magnitude", "wanda", "sparsegpt"} <= set(methods())


@pytest.mark.parametrize("sparsity,pattern,message", [
    (1.0, None, r"in \[0, 1\)"),
    (-0.1, None, r"in \[0, 1\)"),
    (None, "4:4", "1 <= N < M"),
    (None, "5:4", "1 <= N < M"),
    (None, "0:4", "1 <= N < M"),
    (None, "2-4", "not 'unstructured' or N:M"),
    (0.3, "2:4", "leave the sparsity out"),
])
def test_bad_patterns_are_clear_errors(sparsity, pattern, message):
    with pytest.raises(NeurospecError, match=message):
        make_pattern(sparsity, pattern)


def test_group_size_must_divide_the_width_and_options_are_checked():
    W = torch.randn(4, 6)
    with pytest.raises(NeurospecError, match="6 inputs, which is not a multiple of .* M=4"):
        prune_weight("magnitude", W, None, make_pattern(None, "2:4"))
    with pytest.raises(NeurospecError, match="takes no option"):
        prune_weight("wanda", W, torch.ones(6), make_pattern(0.5), blocksize=4)
    with pytest.raises(NeurospecError, match="needs calibration statistics"):
        prune_weight("sparsegpt", W, None, make_pattern(0.5))
    with pytest.raises(NeurospecError, match="multiple of the N:M group size"):
        prune_weight("sparsegpt", torch.randn(4, 8), torch.eye(8), make_pattern(None, "2:4"), blocksize=6)


def test_layer_functions_leave_the_given_weight_unchanged():
    """Also for a transposed view (how GPT-2's Conv1D weight is seen as [out, in])."""
    W, X, H = problem(seed=8)
    stored = W.t().contiguous()  # [in, out] storage
    for name in methods():
        view = stored.t()
        before = stored.clone()
        stat = {"none": None, "norms": X.norm(dim=0), "hessian": H}[methods()[name].stats]
        prune_weight(name, view, stat, make_pattern(0.5))
        assert torch.equal(stored, before), name


def test_lowest_k_selection_equals_a_stable_sort_with_ties():
    from neurospec.sparsity.patterns import lowest_overall, lowest_per_row

    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (7, 9), generator=g).float()  # many ties
    for k in range(10):
        want = torch.zeros_like(score, dtype=torch.bool)
        for r in range(7):
            order = sorted(range(9), key=lambda j: (float(score[r, j]), j))
            want[r, order[:k]] = True
        assert torch.equal(lowest_per_row(score, k), want), k
    for k in (0, 1, 20, 63):
        flat = sorted(range(63), key=lambda i: (float(score.reshape(-1)[i]), i))
        want = torch.zeros(63, dtype=torch.bool)
        want[flat[:k]] = True
        assert torch.equal(lowest_overall(score, k), want.reshape(7, 9)), k
