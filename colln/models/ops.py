"""Col-Ln token pruning and token merging (Col-Ln + merge, ToMe) as plain tensor functions (no
timm import).

Shapes: ``attn`` is softmax attention ``[B, H, N, N]`` (rows = queries, columns = keys),
``x`` is tokens ``[B, N, C]``, the first ``num_prefix`` tokens are prefix tokens ([CLS], registers,
distillation) that are never candidates. Every ``k`` is a Python int so that exported graphs have
TopK with a constant K and static shapes. Merges are dense 0/1 assignment matrices and MatMuls:
no Scatter (TensorRT rejects, or miscomputes, ScatterElements with a reduction).
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


def group_scores(
    scores: torch.Tensor,
    group: int,
) -> torch.Tensor:
    """A VLM tower's groups (the k x k patches its projector joins, ``group`` = k*k consecutive
    candidates each): each group's score is the sum of its patches'. ``[B, N] -> [B, N / group]``."""
    if group == 1:
        return scores
    b, n = scores.shape
    return scores.reshape(b, n // group, group).sum(dim=-1)


def group_members(
    indices: torch.Tensor,
    group: int,
) -> torch.Tensor:
    """The candidates of the groups at ``indices`` ``[B, k]``, each group's ``group`` consecutive
    candidates in their order: ``[B, k * group]`` (an Add of a constant range: no Scatter)."""
    if group == 1:
        return indices
    b, k = indices.shape
    inside = torch.arange(group, device=indices.device)
    return (indices.unsqueeze(-1) * group + inside).reshape(b, k * group)


def select_by_score(
    attn_mean: torch.Tensor,
    num_prefix: int,
    k: int,
    config: PruneConfig,
    group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``k`` candidates. Returns ``(indices [B, k] into the candidates, scores [B, N - num_prefix])``.

    The returned scores are the metric's own (the Col-Ln norm for ``colln`` and ``correct``, the
    [CLS] row for ``cls``): validation takes its boundary margin from them; :func:`fuse_weights`
    turns them into the fused token's weights. With ``group`` > 1 (a VLM tower's projector groups)
    ``k``, the indices and the scores are of groups (:func:`group_scores`).
    """
    if config.metric == "cls":
        scores = group_scores(cls_score(attn_mean, num_prefix), group)
        return topk_indices(scores, k), scores
    scores = group_scores(colln_score(attn_mean, num_prefix, config.norm, root=True), group)
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


def dropped(
    x: torch.Tensor,
    ids: torch.Tensor,
    order: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates of ``x`` ``[B, N, C]`` (patch ids ``ids`` ``[B, N]``) that ``order`` ``[B, k]``
    does not continue, in candidate order: ``([B, N - k, C], [B, N - k])``. Each dropped candidate's
    slot is a running count (CumSum), its row a one-hot MatMul: no TopK (validation reads a graph's
    TopKs as its selections) and no Scatter."""
    n, k = x.shape[1], order.shape[1]
    gone = 1.0 - one_hot(order, n).sum(dim=1)  # [B, N]: 1 where dropped
    slot = torch.cumsum(gone, dim=-1) - 1.0
    pick = (slot.unsqueeze(1) == torch.arange(n - k, device=x.device).unsqueeze(-1)).to(x.dtype) * gone.unsqueeze(1).to(x.dtype)
    # Patch ids are below 2**24: exact through a float product.
    return pick @ x, (pick @ ids.to(x.dtype).unsqueeze(-1)).squeeze(-1).round().long()


def order_by_id(
    ids: torch.Tensor,
) -> torch.Tensor:
    """Where each id of ``0..n-1`` stands in ``ids`` ``[B, n]`` (a permutation): the inverse
    permutation, as a TopK of constant K (a Sort's K would come from the shape)."""
    return torch.topk(ids, ids.shape[-1], dim=-1, largest=False).indices


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


def select_in_order(
    attn_mean: torch.Tensor,
    num_prefix: int,
    k: int,
    config: PruneConfig,
    group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_by_score`, then the picks in spatial order when ``config.spatial_order``."""
    indices, scores = select_by_score(attn_mean, num_prefix, k, config, group)
    if config.spatial_order:
        # topk, not sort: sort exports as a TopK whose K is computed from the shape (TensorRT wants a constant).
        indices = torch.topk(indices, k, dim=-1, largest=False).values
    return indices, scores


def prune_tokens(
    x: torch.Tensor,
    attn: torch.Tensor,
    num_prefix: int,
    k: int,
    config: PruneConfig,
    group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pruning step with ``config``'s metric, fusion and order. Returns ``(tokens, indices, scores)``.

    ``tokens`` is ``[prefix, kept..., (fused)]``; kept tokens come in score order unless
    ``config.spatial_order``. ``indices`` index the candidates (``x[:, num_prefix:]``); with
    ``group`` > 1, ``k`` whole groups are kept and ``indices`` and ``scores`` are of groups.
    """
    attn_mean = head_mean(attn)
    indices, scores = select_in_order(attn_mean, num_prefix, k, config, group)
    out = gather_tokens(x, group_members(indices, group), num_prefix)
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


def one_hot(
    indices: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """``[B, k]`` indices -> ``[B, k, n]`` float 0/1 rows. A comparison with a constant range, not a
    Scatter: TensorRT refuses ScatterElements with a reduction, and the merges below only need
    products with these rows."""
    return (indices.unsqueeze(-1) == torch.arange(n, device=indices.device)).float()


def merge_tokens(
    x: torch.Tensor,
    keys: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Col-Ln + merge (and PruMerge): every pruned candidate joins the kept token whose key is most
    similar (cosine), and each kept token becomes the ``weights``-weighted mean of itself and the
    tokens it absorbed.

    ``x`` [B, N, C] and ``keys`` [B, N, D] are the candidates' features and attention keys,
    ``indices`` [B, k] the kept ones, ``weights`` [B, N] positive averaging weights (the metric's
    scores for PruMerge, the sizes for a size-weighted mean), ``sizes`` [B, N] how many patches each
    candidate already stands for (``None``: one each). Returns ``(merged [B, k, C], sizes [B, k])``
    in the order of ``indices``. One dense assignment matrix and a MatMul: shapes stay static and
    there is no Scatter in the graph.
    """
    n, k = x.shape[1], indices.shape[1]
    kept_hot = one_hot(indices, n)  # [B, k, N]
    nearest = _similarity_to_kept(keys, kept_hot).argmax(dim=1)  # [B, N]: the most similar kept token
    # A kept token belongs to itself (its own similarity ties with any duplicate key).
    pruned = 1.0 - kept_hot.sum(dim=1, keepdim=True)  # [B, 1, N]
    assign = kept_hot + one_hot(nearest, k).transpose(1, 2) * pruned  # [B, k, N]
    return _weighted_mean(assign.to(x.dtype), x, weights, sizes)


def _similarity_to_kept(
    keys: torch.Tensor,
    kept_hot: torch.Tensor,
) -> torch.Tensor:
    """Cosine similarity of every candidate's key to each kept token's: ``[B, k, N]``."""
    unit = torch.nn.functional.normalize(keys, dim=-1)
    return (kept_hot.to(unit.dtype) @ unit) @ unit.transpose(1, 2)


def _weighted_mean(
    assign: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    sizes: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the 0/1 ``assign`` [B, M, N] as weighted means of ``x`` [B, N, C], and their sizes."""
    w = assign * weights.to(x.dtype).unsqueeze(1)
    merged = (w @ x) / w.sum(dim=-1, keepdim=True)
    ones = torch.ones_like(weights) if sizes is None else sizes
    return merged, (assign @ ones.to(x.dtype).unsqueeze(-1)).squeeze(-1)


def merge_margin(
    keys: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Per image, the smallest gap between a pruned candidate's best and second-best cosine
    similarity to the kept tokens (``inf`` when nothing is pruned or one token is kept): a small
    gap means the most-similar choice of :func:`merge_tokens` can flip between backends."""
    n, k = keys.shape[1], indices.shape[1]
    if k < 2 or k >= n:
        return torch.full(keys.shape[:1], float("inf"))
    kept_hot = one_hot(indices, n)
    top2 = torch.topk(_similarity_to_kept(keys, kept_hot), 2, dim=1).values  # [B, 2, N]
    gap = top2[:, 0] - top2[:, 1]
    return gap.masked_fill(kept_hot.sum(dim=1) > 0, float("inf")).amin(dim=-1)


def head_mean_keys(
    keys: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """ToMe's similarity features: keys ``[B, N, H * D]`` averaged over the heads -> ``[B, N, D]``."""
    b, n, _ = keys.shape
    return keys.reshape(b, n, num_heads, -1).mean(dim=2)


def _bipartite_sets(
    num_prefix: int,
) -> tuple[int, int]:
    """Where ToMe's sets A and B start among the candidates (``x[:, num_prefix:]``) when the
    whole sequence, prefix included, alternates A, B, A, ... from token 0 (the official
    ``bipartite_soft_matching``): after an odd prefix ([CLS]) the first candidate is in B. Prefix
    tokens are in the sets but protected (never a source or a destination), so only the candidates'
    share of each set is matched: A = candidates ``a0, a0 + 2, ...``, B = ``b0, b0 + 2, ...``."""
    a0 = num_prefix % 2
    return a0, 1 - a0


def bipartite_edges(
    mean_keys: torch.Tensor,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite graph (see :func:`_bipartite_sets`) between the candidates of set A and of
    set B. Returns, per A candidate in sequence order, the cosine similarity of its best edge
    ``[B, N_a]``, that edge's B candidate ``[B, N_a]`` (index into the B candidates), and the gap to
    its second best edge ``[B, N_a]`` (``inf`` with a single B candidate; for the tie rule)."""
    a0, b0 = _bipartite_sets(num_prefix)
    unit = torch.nn.functional.normalize(mean_keys[:, num_prefix:], dim=-1)
    sim = unit[:, a0::2] @ unit[:, b0::2].transpose(1, 2)  # [B, N_a, N_b]
    best, dst = sim.max(dim=-1)
    if sim.shape[-1] < 2:
        return best, dst, torch.full_like(best, float("inf"))
    top2 = torch.topk(sim, 2, dim=-1).values
    return best, dst, top2[..., 0] - top2[..., 1]


def bipartite_merge(
    x: torch.Tensor,
    mean_keys: torch.Tensor,
    sizes: torch.Tensor,
    r: int,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching (Bolya et al. 2023, the official ``bipartite_soft_matching``):
    the ``r`` A candidates whose best edges (see :func:`bipartite_edges`) are the most similar merge
    into their B candidates; every merged token is the size-weighted mean of what it absorbed.
    ``x`` [B, N, C], ``mean_keys`` [B, N, D] (head-mean keys, :func:`head_mean_keys`), ``sizes`` [B, N] patches per token;
    ``0 < r <= N_a`` with ``N_a`` the A candidates (the official clamp, ``(N - num_prefix) // 2``,
    never exceeds it).

    Returns ``(tokens [B, N - r, C], sizes [B, N - r], merged [B, r], order [B, N - r - num_prefix])``.
    Tokens are the prefix (protected, in front in its order), the unmerged A candidates, then every
    B candidate in its order (ToMe's layout). The unmerged A candidates come in sequence order when
    there is a prefix (the official code sorts them so [CLS] stays first) and by best-edge
    similarity, descending, without one (the official order; it decides the next block's sets).
    ``merged`` indexes the A candidates that merged, ``order`` the candidate (``x[:, num_prefix:]``)
    each output candidate continues (a B candidate continues itself, merged or not). Edges ranked by
    a TopK of constant K, the merge a 0/1 assignment matrix and MatMuls: static shapes, no Scatter.
    """
    p = num_prefix
    a0, b0 = _bipartite_sets(p)
    best, dst, _ = bipartite_edges(mean_keys, p)
    n_a, n_b = best.shape[-1], x.shape[1] - p - best.shape[-1]
    ranked = torch.topk(best, n_a, dim=-1).indices
    src, unmerged = ranked[:, :r], ranked[:, r:]
    if p and r < n_a:
        # Back in sequence order: a TopK (constant K) of their indices, not a Sort.
        unmerged = torch.topk(unmerged, n_a - r, dim=-1, largest=False).values
    merged_a = one_hot(src, n_a).sum(dim=1)  # [B, N_a]: 1 where an A candidate merges
    into_b = one_hot(dst, n_b).transpose(1, 2) * merged_a.unsqueeze(1)  # [B, N_b, N_a]
    cand, size = x[:, p:], sizes[:, p:]
    a, b = cand[:, a0::2], cand[:, b0::2]
    size_a, size_b = size[:, a0::2], size[:, b0::2]
    # B rows: each B candidate plus the A candidates it absorbs, over the concatenation [A, B].
    itself = torch.eye(n_b, dtype=into_b.dtype, device=x.device).expand(x.shape[0], n_b, n_b)
    size_ab = torch.cat([size_a, size_b], dim=1)
    merged_b, size_out_b = _weighted_mean(
        torch.cat([into_b, itself], dim=-1).to(x.dtype), torch.cat([a, b], dim=1), size_ab, size_ab
    )
    tokens = torch.cat([x[:, :p], gather_tokens(a, unmerged, 0), merged_b], dim=1)
    b_order = (b0 + 2 * torch.arange(n_b, device=x.device)).expand(x.shape[0], n_b)
    order = torch.cat([a0 + 2 * unmerged, b_order], dim=1)
    return tokens, torch.cat([sizes[:, :p], size_a.gather(-1, unmerged), size_out_b], dim=1), src, order
