"""Col-Ln token pruning as plain tensor functions (no timm import).

Shapes: ``attn`` is softmax attention ``[B, H, N, N]`` (rows = queries, columns = keys),
``x`` is tokens ``[B, N, C]``, the first ``num_prefix`` tokens are prefix tokens ([CLS], registers,
distillation) that are never candidates. Every ``k`` is a Python int so that exported graphs have
TopK with a constant K and static shapes.
"""

from __future__ import annotations

import torch

from colln.models.config import PruneConfig


def head_mean(attn: torch.Tensor) -> torch.Tensor:
    """Average softmax attention over heads: ``[B, H, N, N] -> [B, N, N]``."""
    return attn.mean(dim=1)


def colln_score(
    attn_mean: torch.Tensor,
    num_prefix: int,
    norm: float = 4.0,
    root: bool = True,
) -> torch.Tensor:
    """Col-Ln score of each candidate key column: ``||A[:, :, j]||_n`` over all queries.

    ``root=False`` returns ``sum_i A[i, j]^n``: the same ranking for n > 0, one op cheaper.
    Returns ``[B, N - num_prefix]``.
    """
    cols = attn_mean[:, :, num_prefix:]
    if norm == 1:
        return cols.sum(dim=1)
    powered = _power(cols, norm).sum(dim=1)
    return powered.pow(1.0 / norm) if root else powered


def _power(
    x: torch.Tensor,
    n: float,
) -> torch.Tensor:
    """``x ** n``; a whole ``n`` up to 16 as repeated squaring (two Muls for n = 4). ONNX Runtime's
    CPU Pow calls scalar pow() per element, about 10x slower than its vectorised Mul
    (benchmarks/README.md), and this runs on the whole ``[B, N, N]`` attention at every pruning layer."""
    if not (float(n).is_integer() and 1 <= n <= 16):
        return x.pow(n)
    n = int(n)
    result = None
    while n:
        if n & 1:
            result = x if result is None else result * x
        n >>= 1
        if n:
            x = x * x
    return result


def cls_score(
    attn_mean: torch.Tensor,
    num_prefix: int,
    cls_index: int = 0,
) -> torch.Tensor:
    """[CLS] attention to each candidate: ``A[cls_index, j]``. Returns ``[B, N - num_prefix]``."""
    return attn_mean[:, cls_index, num_prefix:]


def topk_indices(
    scores: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """Indices of the ``k`` largest scores along the last axis, in descending score order."""
    return torch.topk(scores, k, dim=-1, largest=True, sorted=True).indices


def rescue_indices(
    cls_scores: torch.Tensor,
    colln_scores: torch.Tensor,
    k: int,
    rescue: float,
) -> torch.Tensor:
    """[CLS]-correcting selection: ``k - r`` tokens by [CLS] attention, then ``r = floor(k * rescue)``
    more by Col-Ln among the tokens [CLS] did not pick."""
    r = int(k * rescue + 1e-9)
    by_cls = topk_indices(cls_scores, k - r)
    if r == 0:
        return by_cls
    # Mask the [CLS] picks below every real score (scores are >= 0) so the second top-k skips them.
    picked = torch.zeros_like(colln_scores).scatter(-1, by_cls, 1.0)
    masked = colln_scores - picked * (colln_scores.amax(dim=-1, keepdim=True) + 1.0)
    return torch.cat([by_cls, topk_indices(masked, r)], dim=-1)


def select(
    attn_mean: torch.Tensor,
    num_prefix: int,
    k: int,
    config: PruneConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``k`` candidates. Returns ``(indices [B, k] into the candidates, scores [B, N - num_prefix])``.

    The returned scores are the metric's own (the Col-Ln norm for ``colln`` and ``correct``, the
    [CLS] row for ``cls``): validation takes its boundary margin from them; :func:`fuse_weights`
    turns them into the fused token's weights.
    """
    if config.metric == "cls":
        scores = cls_score(attn_mean, num_prefix)
        return topk_indices(scores, k), scores
    scores = colln_score(attn_mean, num_prefix, config.norm, root=True)
    if config.metric == "colln":
        return topk_indices(scores, k), scores
    return rescue_indices(cls_score(attn_mean, num_prefix), scores, k, config.rescue), scores


def gather_tokens(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_prefix: int,
) -> torch.Tensor:
    """Prefix tokens followed by the candidates at ``indices``: ``[B, num_prefix + k, C]``."""
    cand = x[:, num_prefix:]
    b, n, c = cand.shape
    # Whole rows of the batch-flattened candidates (ONNX Gather, a row copy each) rather than
    # torch.gather's per-element GatherElements with [B, k, C] indices: 4x faster on ORT CPU.
    rows = (indices + torch.arange(b, device=x.device).unsqueeze(-1) * n).reshape(-1)
    kept = cand.reshape(b * n, c).index_select(0, rows).reshape(b, -1, c)
    return torch.cat([x[:, :num_prefix], kept], dim=1)


def fuse_weights(
    attn_mean: torch.Tensor,
    scores: torch.Tensor,
    num_prefix: int,
    config: PruneConfig,
) -> torch.Tensor:
    """Each candidate's weight in the fused token, as the authors' code computes it: ``[B, N - num_prefix]``.

    ``cls`` and ``correct`` (their EViT code): the raw head-mean [CLS] attention ``A[cls, j]``, not
    renormalised. ``colln`` (their CLIP / PruMerge code): the Col-Ln ``scores`` divided by the sum of
    the Col-Ln scores of all N columns, prefix columns included, plus 1e-6.
    """
    if config.metric != "colln":
        return cls_score(attn_mean, num_prefix)
    total = scores.sum(dim=-1, keepdim=True)
    if num_prefix:
        total = total + colln_score(attn_mean[:, :, :num_prefix], 0, config.norm).sum(dim=-1, keepdim=True)
    return scores / (total + 1e-6)


def fused_token(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    num_prefix: int,
) -> torch.Tensor:
    """EViT's fused token: the pruned candidates summed, each times its ``weights`` entry (see
    :func:`fuse_weights`). Returns ``[B, 1, C]``.

    A dense mask instead of a second top-k for the complement: shapes stay static and it works for
    any selection (including the rescue one, whose picks are not a prefix of one sorted order).
    """
    kept = torch.zeros_like(weights).scatter(-1, indices, 1.0)
    pruned_weights = weights * (1.0 - kept)
    return torch.einsum("bn,bnc->bc", pruned_weights, x[:, num_prefix:]).unsqueeze(1)


def prune_tokens(
    x: torch.Tensor,
    attn: torch.Tensor,
    num_prefix: int,
    k: int,
    config: PruneConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pruning step with ``config``'s metric, fusion and order. Returns ``(tokens, indices, scores)``.

    ``tokens`` is ``[prefix, kept..., (fused)]``; kept tokens come in score order unless
    ``config.spatial_order``. ``indices`` index the candidates (``x[:, num_prefix:]``).
    """
    attn_mean = head_mean(attn)
    indices, scores = select(attn_mean, num_prefix, k, config)
    if config.spatial_order:
        # topk, not sort: sort exports as a TopK whose K is computed from the shape (TensorRT wants a constant).
        indices = torch.topk(indices, k, dim=-1, largest=False).values
    out = gather_tokens(x, indices, num_prefix)
    if config.fuse:
        out = torch.cat([out, fused_token(x, indices, fuse_weights(attn_mean, scores, num_prefix, config), num_prefix)], dim=1)
    return out, indices, scores


def boundary_margin(
    scores: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """Per-image gap between the k-th and (k+1)-th largest score (``inf`` when nothing is pruned).

    A small margin means the top-k choice can flip on float noise between backends.
    """
    if k >= scores.shape[-1]:
        return torch.full(scores.shape[:1], float("inf"))
    top = torch.topk(scores, k + 1, dim=-1).values
    return top[:, k - 1] - top[:, k]


def order_by_patch_id(
    indices: torch.Tensor,
    ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder picks into spatial order: ``indices`` [B, k] into the candidates and their patch ``ids``
    [B, k], both sorted by patch id (a TopK with constant k, like ``prune_tokens``' spatial order)."""
    sorted_ids, pos = torch.topk(ids, ids.shape[-1], dim=-1, largest=False)
    return indices.gather(-1, pos), sorted_ids


def merge_tokens(
    x: torch.Tensor,
    keys: torch.Tensor,
    indices: torch.Tensor,
    scores: torch.Tensor,
) -> torch.Tensor:
    """PruMerge-style merge: every pruned candidate joins the kept token whose key is most similar
    (cosine), and each kept token becomes the score-weighted mean of itself and the tokens it absorbed.

    ``x`` [B, N, C] and ``keys`` [B, N, D] are the candidates' features and attention keys,
    ``indices`` [B, k] the kept ones, ``scores`` [B, N] the metric's (positive) scores. Returns
    [B, k, C] in the order of ``indices``. One dense assignment matrix: shapes stay static.
    """
    b, k = indices.shape
    unit = torch.nn.functional.normalize(keys, dim=-1)
    kept_keys = unit.gather(1, indices.unsqueeze(-1).expand(b, k, unit.shape[-1]))
    nearest = (kept_keys @ unit.transpose(1, 2)).argmax(dim=1)  # [B, N]: the most similar kept token
    kept = torch.zeros_like(scores).scatter(-1, indices, 1.0) > 0
    # A kept token belongs to itself (its own similarity ties with any duplicate key).
    position = torch.zeros_like(scores, dtype=indices.dtype).scatter(-1, indices, torch.arange(k, device=x.device).expand(b, k))
    owner = torch.where(kept, position, nearest)
    assign = owner.unsqueeze(1) == torch.arange(k, device=x.device).view(1, k, 1)  # [B, k, N]
    weights = assign.to(x.dtype) * scores.to(x.dtype).unsqueeze(1)
    return (weights @ x) / weights.sum(dim=-1, keepdim=True)
