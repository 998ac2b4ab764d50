"""Plain per-image references for the merging tests, written from the papers (ToMe: Bolya et al.
2023; Col-Ln + merge: colln's issue 20) with Python loops over tokens, sharing no code with
``colln.models.ops``. For the bundled digits_vit (timm Attention without q/k norms, [CLS] pooling).
Also the checks tests/test_merge.py and tests/test_tome.py share."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

# fp32 validation's tie band: images with a choice this close are not compared with a reference.
TIE = 1e-4


def clear_images(
    selections: list,
    n: int,
) -> np.ndarray:
    """Images whose top-k boundaries (kept sets, ToMe's edge ranks) and merge destinations all have
    margins above the tie band, from ``colln.record_selections``."""
    from colln.models import ops

    ok = np.ones(n, dtype=bool)
    for s in selections:
        rel = ops.boundary_margin(s.scores, s.indices.shape[1]) / s.scores.abs().amax(-1)
        ok &= (rel > TIE).numpy() & (s.merge_margin > TIE).numpy()
    return ok


def graph_ops(
    export_dir: Path,
) -> Counter:
    """Op types of an export's ONNX graph, after checking there is no Scatter of any kind."""
    ops_used = Counter(n.op_type for n in onnx.load(str(export_dir / "model.onnx")).graph.node)
    assert not [op for op in ops_used if op.startswith("Scatter")], ops_used
    return ops_used


def tensorrt_builds(
    export_dir: Path,
    tmp_path: Path,
) -> bool:
    """TensorRT (TensorRT-RTX on CPU machines) parses and builds a copy of the export."""
    from colln.export.tensorrt import build_engine

    work = shutil.copytree(export_dir, tmp_path / export_dir.name)
    return build_engine(work, 1, 2, 4, timing_cache=tmp_path / "timing.cache").is_file()


def export_error(
    args: list[str],
    tmp_path: Path,
    capsys,
) -> str:
    """``colln-export digits_vit ARGS``: must exit 2 with one error line and write nothing; returns the line."""
    from colln.app.export_cli import main

    assert main(["digits_vit", *args, "--out", str(tmp_path / "x")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("colln: error:")]
    assert len(errors) == 1 and not (tmp_path / "x").exists(), errors
    return errors[0]


def digits_variant(
    trained: nn.Module,
    class_token: bool,
    reg_tokens: int,
) -> nn.Module:
    """The trained digits_vit's blocks and head in a timm ViT with another prefix: without [CLS]
    (average pooling, no prefix) or with register tokens after [CLS]. Patch positions keep their
    trained embeddings, [CLS] gets its own folded in; registers are small random tokens. Not a good
    classifier, but its merge choices are as clear as the trained model's."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=32,
        patch_size=4,
        num_classes=10,
        embed_dim=64,
        depth=8,
        num_heads=4,
        qkv_bias=True,
        class_token=class_token,
        reg_tokens=reg_tokens,
        global_pool="token" if class_token else "avg",
        fc_norm=False,
        no_embed_class=True,
    )
    state = {k: v for k, v in trained.state_dict().items() if k not in ("cls_token", "pos_embed")}
    state["pos_embed"] = trained.pos_embed[:, 1:]
    if class_token:
        state["cls_token"] = trained.cls_token + trained.pos_embed[:, :1]
    if reg_tokens:
        state["reg_token"] = torch.randn(1, reg_tokens, 64, generator=torch.Generator().manual_seed(0))
    model.load_state_dict(state)
    model.pretrained_cfg = trained.pretrained_cfg
    return model.eval()


def plain_attention(
    attn: nn.Module,
    x: torch.Tensor,
    sizes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image ``x`` [N, C]: head by head, softmax(q k^T * scale + log size) v. Returns the
    projected output [N, C], the probabilities [H, N, N] and the keys [N, H, D]."""
    n = x.shape[0]
    h, d = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(n, 3, h, d)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    out = torch.zeros(n, h * d)
    probs = torch.zeros(h, n, n)
    for head in range(h):
        logits = (q[:, head] @ k[:, head].T) * attn.scale + sizes.log()[None, :]
        probs[head] = logits.softmax(dim=-1)
        out[:, head * d : (head + 1) * d] = probs[head] @ v[:, head]
    return attn.proj(out), probs, k


def _cos(
    u: torch.Tensor,
    v: torch.Tensor,
) -> float:
    return float(u @ v / (u.norm() * v.norm()))


def _mean(
    x: torch.Tensor,
    group: list[int],
    weights: list[float],
) -> torch.Tensor:
    return sum(w * x[g] for g, w in zip(group, weights)) / sum(weights)


def plain_tome(
    x: torch.Tensor,
    mean_keys: torch.Tensor,
    sizes: torch.Tensor,
    r: int,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """ToMe's bipartite soft matching on one image, from the official ``bipartite_soft_matching``'s
    rules: ALL tokens alternate into A (0, 2, 4, ...) and B (1, 3, ...); prefix tokens are
    protected (similarity -inf as a source and as a destination); r is clamped to
    (N - protected) // 2; each A token keeps its most cosine-similar B token, A tokens are ranked
    by that similarity and the first r merge (size-weighted means). The unmerged A tokens keep the
    ranking's order, sorted back into sequence order when there is a prefix. Layout: prefix
    tokens in front in their order (colln's rule for more than one; the official one for [CLS]),
    unmerged A, then all B. Returns (tokens, sizes, the input token each output candidate
    continues, as an index into the candidates)."""
    n, p = x.shape[0], num_prefix
    r = min(r, (n - p) // 2)
    a_set, b_set = list(range(0, n, 2)), list(range(1, n, 2))
    best = {}
    for a in a_set:
        sims = [-math.inf if a < p or b < p else _cos(mean_keys[a], mean_keys[b]) for b in b_set]
        j = max(range(len(b_set)), key=lambda t: sims[t])
        best[a] = (sims[j], b_set[j])
    ranked = sorted(a_set, key=lambda a: -best[a][0])
    merged, unmerged = ranked[:r], ranked[r:]
    if p:
        unmerged = sorted(unmerged)
    kept = list(range(p)) + [a for a in unmerged if a >= p] + [b for b in b_set if b >= p]
    rows, out_sizes = [], []
    for t in kept:
        group = [t] + [a for a in merged if best[a][1] == t]
        weights = [float(sizes[g]) for g in group]
        rows.append(_mean(x, group, weights))
        out_sizes.append(sum(weights))
    return torch.stack(rows), torch.tensor(out_sizes), [t - p for t in kept[p:]]


def plain_colln_merge(
    x: torch.Tensor,
    keys: torch.Tensor,
    probs: torch.Tensor,
    sizes: torch.Tensor,
    k: int,
    num_prefix: int,
    weight: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Col-Ln + merge on one image: the k candidates with the largest column 4-norm of the head-mean
    attention stay (in score order); every other candidate joins the kept one whose key (all heads
    concatenated) is the most similar by cosine; kept tokens become means weighted by size or by
    score x size."""
    p = num_prefix
    a = probs.mean(dim=0)
    n = a.shape[0]
    scores = [float(sum(float(a[i, j]) ** 4 for i in range(n)) ** 0.25) for j in range(p, n)]
    kept = sorted(range(len(scores)), key=lambda j: -scores[j])[:k]
    flat = keys.reshape(n, -1)[p:]
    cand = x[p:]
    groups = {c: [c] for c in kept}
    for j in range(len(scores)):
        if j not in groups:
            groups[max(kept, key=lambda c: _cos(flat[j], flat[c]))].append(j)
    rows, out_sizes = [x[i] for i in range(p)], [float(sizes[i]) for i in range(p)]
    for c in kept:
        group = groups[c]
        rows.append(_mean(cand, group, [float(sizes[p + g]) * (scores[g] if weight == "score" else 1.0) for g in group]))
        out_sizes.append(sum(float(sizes[p + g]) for g in group))
    return torch.stack(rows), torch.tensor(out_sizes)


@torch.no_grad()
def plain_forward(
    model: nn.Module,
    image: torch.Tensor,
    tome: dict[int, int] | None = None,
    merge: dict[int, int] | None = None,
    weight: str = "size",
    prop_attn: bool = True,
) -> torch.Tensor:
    """The logits of the unpruned timm ``model`` on one image [3, H, W], merging ``tome`` {block: r}
    or Col-Ln ``merge`` {block: k} after each such block's attention residual; with ``prop_attn``
    every later attention adds log(size)."""
    p = model.num_prefix_tokens
    x = model._pos_embed(model.patch_embed(image[None]))[0]
    sizes = torch.ones(x.shape[0])
    for i, blk in enumerate(model.blocks):
        out, probs, keys = plain_attention(blk.attn, blk.norm1(x), sizes if prop_attn else torch.ones(x.shape[0]))
        x = x + out
        if tome and tome.get(i):
            x, sizes, _ = plain_tome(x, keys.mean(dim=1), sizes, tome[i], p)
        elif merge and i in merge:
            x, sizes = plain_colln_merge(x, keys, probs, sizes, merge[i], p, weight)
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x)[None])[0]
