"""The pure Col-Ln functions against the formulas written out plainly (loops, no vectorisation)."""

import math

import pytest
import torch

from colln.models import ops
from colln.models.config import METRICS, PruneConfig


def _attention(
    b: int,
    h: int,
    n: int,
    seed: int = 0,
    sharpness: float = 3.0,
) -> torch.Tensor:
    """Random softmax attention with visibly different columns (rows sum to 1)."""
    gen = torch.Generator().manual_seed(seed)
    logits = sharpness * torch.randn(b, h, n, n, generator=gen, dtype=torch.float64)
    return logits.softmax(dim=-1)


def _plain_colln(
    attn: torch.Tensor,
    num_prefix: int,
    norm: float,
) -> list[list[float]]:
    """score[b][j] = (sum_i mean_h(A)[b, i, j] ** n) ** (1 / n), candidates j >= num_prefix."""
    b, h, n, _ = attn.shape
    out = []
    for bi in range(b):
        row = []
        for j in range(num_prefix, n):
            total = 0.0
            for i in range(n):
                a = sum(float(attn[bi, hi, i, j]) for hi in range(h)) / h
                total += a**norm
            row.append(total ** (1.0 / norm))
        out.append(row)
    return out


@pytest.mark.parametrize("norm", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("num_prefix", [0, 1, 5])
def test_colln_score_is_the_column_ln_norm(norm: float, num_prefix: int) -> None:
    attn = _attention(2, 3, 9)
    got = ops.colln_score(ops.head_mean(attn), num_prefix, norm)
    assert got.shape == (2, 9 - num_prefix)
    assert torch.allclose(got, torch.tensor(_plain_colln(attn, num_prefix, norm), dtype=got.dtype), atol=1e-12)


def test_sum_of_powers_ranks_like_the_norm() -> None:
    am = ops.head_mean(_attention(4, 2, 16, seed=1))
    with_root = ops.colln_score(am, 1, 4.0, root=True)
    powers = ops.colln_score(am, 1, 4.0, root=False)
    assert torch.allclose(powers, with_root**4)
    assert torch.equal(ops.topk_indices(with_root, 7), ops.topk_indices(powers, 7))


def test_norm_one_is_attention_received() -> None:
    am = ops.head_mean(_attention(1, 2, 6))
    assert torch.allclose(ops.colln_score(am, 1, 1.0)[0], am[0, :, 1:].sum(dim=0))


def test_cls_score_is_the_cls_row() -> None:
    am = ops.head_mean(_attention(2, 2, 7))
    got = ops.cls_score(am, num_prefix=2)
    for b in range(2):
        assert got[b].tolist() == [float(am[b, 0, j]) for j in range(2, 7)]


def test_topk_keeps_the_k_largest_in_descending_order() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.5]])
    assert ops.topk_indices(scores, 3).tolist() == [[1, 3, 4]]


def _plain_rescue(
    cls_row: list[float],
    colln_row: list[float],
    k: int,
    c: float,
) -> set[int]:
    r = math.floor(k * c)
    by_cls = sorted(range(len(cls_row)), key=lambda j: -cls_row[j])[: k - r]
    rest = [j for j in range(len(colln_row)) if j not in by_cls]
    by_colln = sorted(rest, key=lambda j: -colln_row[j])[:r]
    return set(by_cls) | set(by_colln)


@pytest.mark.parametrize("k,rescue", [(10, 0.2), (10, 0.4), (7, 0.0), (5, 0.5)])
def test_rescue_selection_matches_the_paper_recipe(k: int, rescue: float) -> None:
    am = ops.head_mean(_attention(3, 4, 25, seed=2))
    idx = ops.select_by_score(am, 1, k, PruneConfig(metric="correct", rescue=rescue))[0]
    cls_scores = ops.cls_score(am, 1)
    colln_scores = ops.colln_score(am, 1, 4.0)
    assert idx.shape == (3, k)
    for b in range(3):
        assert len(set(idx[b].tolist())) == k
        assert set(idx[b].tolist()) == _plain_rescue(cls_scores[b].tolist(), colln_scores[b].tolist(), k, rescue)


def test_rescue_differs_from_pure_cls_when_cls_misses_colln_tokens() -> None:
    am = ops.head_mean(_attention(3, 4, 25, seed=2))
    by_cls = ops.select_by_score(am, 1, 10, PruneConfig(metric="cls"))[0]
    corrected = ops.select_by_score(am, 1, 10, PruneConfig(metric="correct", rescue=0.4))[0]
    assert any(set(by_cls[b].tolist()) != set(corrected[b].tolist()) for b in range(3))


def test_gather_keeps_prefix_tokens_first() -> None:
    x = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    idx = torch.tensor([[3, 0], [1, 2]])
    out = ops.gather_tokens(x, idx, num_prefix=2)
    assert out.shape == (2, 4, 3)
    assert torch.equal(out[:, :2], x[:, :2])
    assert torch.equal(out[0, 2], x[0, 2 + 3]) and torch.equal(out[0, 3], x[0, 2 + 0])
    assert torch.equal(out[1, 2], x[1, 2 + 1]) and torch.equal(out[1, 3], x[1, 2 + 2])


def _plain_fused(
    attn: torch.Tensor,
    x: torch.Tensor,
    kept: list[int],
    num_prefix: int,
    metric: str,
    norm: float,
) -> torch.Tensor:
    """One image, the authors' fused-token rule written out: pruned candidate j weighted by the raw
    head-mean [CLS] attention A[0, j] (cls, correct), or by its Col-Ln score over the Col-Ln scores
    of all N columns, prefix included, + 1e-6 (colln)."""
    h, n, _ = attn.shape
    a = [[sum(float(attn[hi, i, j]) for hi in range(h)) / h for j in range(n)] for i in range(n)]
    col = [sum(a[i][j] ** norm for i in range(n)) ** (1.0 / norm) for j in range(n)]
    fused = torch.zeros(x.shape[-1], dtype=x.dtype)
    for j in range(num_prefix, n):
        if j - num_prefix in kept:
            continue
        w = a[0][j] if metric in ("cls", "correct") else col[j] / (sum(col) + 1e-6)
        fused += w * x[j]
    return fused


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("num_prefix", [1, 3])
def test_fused_token_follows_the_authors_rule(metric: str, num_prefix: int) -> None:
    n = 12
    attn = _attention(2, 3, n, seed=6)
    x = torch.randn(2, n, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out, idx, _ = ops.prune_tokens(x, attn, num_prefix, 4, PruneConfig(metric=metric, fuse=True, norm=2.0))
    for b in range(2):
        expected = _plain_fused(attn[b], x[b], idx[b].tolist(), num_prefix, metric, 2.0)
        assert torch.allclose(out[b, -1], expected, atol=1e-12)


def test_fused_weights_are_not_renormalised_over_the_candidates() -> None:
    """The rules differ from the old one (weights summing to 1 over the candidates): the [CLS] weights
    sum to what [CLS] gives the candidates (< 1, [CLS] attends to itself too), the Col-Ln weights to
    the candidates' share of all N columns."""
    attn = _attention(2, 3, 10, seed=7)
    am = ops.head_mean(attn)
    for metric in METRICS:
        config = PruneConfig(metric=metric)
        _, scores = ops.select_by_score(am, 2, 4, config)
        total = ops.fuse_weights(am, scores, 2, config).sum(dim=-1)
        all_cols = ops.colln_score(am, 0, config.norm)
        if metric == "colln":
            expected = all_cols[:, 2:].sum(dim=-1) / (all_cols.sum(dim=-1) + 1e-6)
        else:
            expected = 1.0 - am[:, 0, :2].sum(dim=-1)
        assert torch.allclose(total, expected)
        assert (total < 1.0 - 1e-3).all()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("fuse", [False, True])
def test_prune_tokens_shapes_and_content(metric: str, fuse: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 17, 8, generator=gen, dtype=torch.float64)
    attn = _attention(2, 2, 17, seed=4)
    out, idx, scores = ops.prune_tokens(x, attn, num_prefix=1, k=6, config=PruneConfig(metric=metric, fuse=fuse))
    assert out.shape == (2, 1 + 6 + int(fuse), 8)
    assert scores.shape == (2, 16)
    for b in range(2):
        for pos, j in enumerate(idx[b].tolist()):
            assert torch.equal(out[b, 1 + pos], x[b, 1 + j])


def test_spatial_order_keeps_the_same_set_sorted_by_position() -> None:
    x = torch.randn(3, 20, 4, dtype=torch.float64)
    attn = _attention(3, 2, 20, seed=5)
    _, by_score, _ = ops.prune_tokens(x, attn, 1, 8, PruneConfig())
    out, spatial, _ = ops.prune_tokens(x, attn, 1, 8, PruneConfig(spatial_order=True))
    for b in range(3):
        assert spatial[b].tolist() == sorted(by_score[b].tolist())
        assert torch.equal(out[b, 1:], x[b, 1 + spatial[b]])


def test_boundary_margin_is_the_gap_between_kth_and_next() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.45], [0.2, 0.2, 0.3, 0.0]])
    margin = ops.boundary_margin(scores, 2)
    assert torch.allclose(margin, torch.tensor([0.05, 0.0]))
    assert torch.isinf(ops.boundary_margin(scores, 4)).all()
