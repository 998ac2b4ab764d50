"""The vision towers of today's VLMs (timm's qwen3_vit, gemma4_vit, deepseek_vit): tokens after the
tower's own projector for whole kept groups, their merged-grid ids and (row, col) positions, checked
against a plain per-image reference: timm's own blocks on the kept tokens with their rotary rows,
the Col-Ln score from softmax(q k^T) written out and summed per k x k group, each kept group joined
by the projector's own layers written out. Tiny configurations of the same classes."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_families import _probs
from timm.models import deepseek_vit, gemma4_vit, qwen3_vit

import colln
from colln.models import coverage

DOCS = Path(__file__).parents[1] / "docs" / "vlm.md"


def _sharpen(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random-init towers attend almost uniformly (near-ties): larger query/key weights give the
    selections clear margins."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"attn\.(qkv|q_proj\.linear|k_proj\.linear)\.weight$", name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def qwen(**options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, pos_embed_grid_size=8, out_features=24)
    model = qwen3_vit.Qwen3VitEncoder(**{**args, **options})
    model.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    return _sharpen(model, 0)


def gemma(cls: type = gemma4_vit.Gemma4VitEncoder, **options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(
        patch_size=4, embed_dim=32, depth=3, num_heads=2, head_dim=16, num_kv_heads=1, intermediate_size=64,
        pooling_kernel_size=2, position_embedding_size=16,
    )  # fmt: skip
    model = cls(**{**args, **options})
    model.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.0,) * 3, "std": (1.0,) * 3}
    return _sharpen(model, 1)


def deepseek(**options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=36, patch_size=4, embed_dim=32, depth=3, num_heads=2, downsample_ratio=3, out_features=24)
    model = deepseek_vit.DeepseekVitEncoder(**{**args, **options})
    model.pretrained_cfg = {"input_size": (3, 36, 36), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    return _sharpen(model, 2)


TOWERS = {"qwen3": qwen, "gemma4": gemma, "deepseek": deepseek}


def _images(model: torch.nn.Module, n: int = 3) -> torch.Tensor:
    size = model.pretrained_cfg["input_size"][-1]
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(5))


class Plain:
    """One image through a tower, written out: raster tokens, timm's blocks, the kept groups."""

    def __init__(self, model: torch.nn.Module, image: torch.Tensor) -> None:
        self.model = model
        if isinstance(model, gemma4_vit.Gemma4VitEncoder):
            x, pos, _ = model.patch_embed(image[None])
            cos, sin = model.rotary_emb(x, pos)
            self.k = model.pooling_kernel_size
            self.grid = int(pos[0, :, 1].max()) + 1, int(pos[0, :, 0].max()) + 1
            self.rows = torch.cat([cos, sin], dim=-1)[0]
        else:
            patches = model.patch_embed(image[None])
            self.grid = tuple(patches.shape[1:3])
            x, self.rows = model._pos_embed(patches)
            self.k = model.merger.merge_size if hasattr(model, "merger") else model.aligner.downsample_ratio
        self.x = x
        h, w = self.grid
        r, c = torch.arange(h * w) // w, torch.arange(h * w) % w
        self.group = (r // self.k) * (w // self.k) + c // self.k  # each patch's merged-grid id
        self.patch = torch.arange(h * w)  # the patches still here

    def run(self, blk: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows[self.patch]
        if isinstance(blk, gemma4_vit.Gemma4Block):
            cos, sin = rows[None].chunk(2, dim=-1)
            return blk(x, cos, sin)
        return blk(x, rope=rows)

    def scores(self, blk: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Col-Ln (n = 4) of the head-mean softmax(q k^T), summed per group still here: ``[groups]``."""
        attn, rows = blk.attn, self.rows[self.patch]
        h = blk.norm1(x)
        if isinstance(attn, gemma4_vit.Gemma4Attention):
            b, n, _ = h.shape
            q = attn.q_norm(attn.q_proj(h).view(b, n, attn.num_heads, -1))
            k = attn.k_norm(attn.k_proj(h).view(b, n, attn.num_kv_heads, -1))
            cos, sin = rows[None].chunk(2, dim=-1)
            q = gemma4_vit.apply_multidimensional_rope(q, cos, sin).transpose(1, 2)
            k = gemma4_vit.apply_multidimensional_rope(k, cos, sin).transpose(1, 2)
            k = k.repeat_interleave(attn.num_kv_groups, dim=1)
            probs = (q @ k.transpose(-2, -1)).softmax(-1)  # Gemma 4 scales by 1: q and k are normed
        else:
            probs = _probs(attn, h, rows)
        per_patch = (probs.mean(1)[0] ** 4).sum(0) ** 0.25
        here = self.group[self.patch].unique()
        return torch.stack([per_patch[self.group[self.patch] == g].sum() for g in here]), here

    def keep(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        mask = torch.isin(self.group[self.patch], groups)
        self.patch = self.patch[mask]
        return x[:, mask]

    def project(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Each group's patches (row-major inside it) through the tower's projector, written out."""
        m, w = self.model, self.grid[1]
        out = []
        for g in groups:
            inside = self.patch[self.group[self.patch] == g]
            t = x[0][self.group[self.patch] == g][torch.argsort(inside)]  # row-major inside the group
            if isinstance(m, qwen3_vit.Qwen3VitEncoder):
                out.append(m.merger.fc2(m.merger.act(m.merger.fc1(m.merger.norm(t).reshape(-1)))))
            elif isinstance(m, deepseek_vit.DeepseekVitEncoder):
                # The aligner's channel-major (C, kh, kw) order.
                t = m.norm(t)
                out.append(m.aligner.fc2(m.aligner.act(m.aligner.fc1(t.T.reshape(-1)))))
            else:
                out.append(t.mean(0) * t.shape[-1] ** 0.5)
        assert w % self.k == 0
        return torch.stack(out)


def reference(model: torch.nn.Module, image: torch.Tensor, ks: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(tokens [K, C_out], merged-grid ids [K] ascending, smallest relative top-k margin)."""
    plain = Plain(model, image)
    x, margin = plain.x, float("inf")
    for i, blk in enumerate(model.blocks):
        if i in ks:
            scores, here = plain.scores(blk, x)
            top = scores.topk(min(ks[i] + 1, len(scores))).values
            if ks[i] < len(scores):
                margin = min(margin, float((top[-2] - top[-1]) / top[0]))
            kept = here[scores.topk(ks[i]).indices]
            x = plain.keep(plain.run(blk, x), kept)
        else:
            x = plain.run(blk, x)
    groups = plain.group[plain.patch].unique()
    return plain.project(x, groups), groups, margin


def _ks(pruned: torch.nn.Module) -> dict[int, int]:
    return {op.layer: op.count for op in colln.get_plan(pruned).operations}


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_keep_one_is_the_towers_own_output(tower: str) -> None:
    model = TOWERS[tower]()
    images = _images(model)
    with torch.no_grad():
        tokens, indices, positions = colln.prune(model, keep=1.0, output="tokens")(images)
        own = model(images)
    torch.testing.assert_close(tokens, own, atol=1e-4, rtol=1e-4)  # group-major order, explicit attention: float noise
    g = own.shape[1]
    w = colln.get_plan(colln.prune(model, keep=1.0, output="tokens")).dims.token_grid[1]
    assert torch.equal(indices, torch.arange(g).expand(len(images), g))
    assert torch.equal(positions, torch.stack([indices // w, indices % w], dim=-1))


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_final_selection_keeps_whole_groups_and_the_towers_own_rows(tower: str) -> None:
    """keep 0.5 without inner pruning: the groups a plain Col-Ln picks, and the tower's own output
    rows at them (its projector saw complete groups)."""
    model = TOWERS[tower]()
    images = _images(model)
    encoder = colln.prune(model, keep=0.5, output="tokens")
    with torch.no_grad():
        tokens, indices, positions = encoder(images)
        own = model(images)
        refs = [reference(model, images[b], _ks(encoder)) for b in range(len(images))]
    k = -(-own.shape[1] // 2)
    assert tokens.shape == (len(images), k, own.shape[-1]) and indices.shape == positions.shape[:2] == (len(images), k)
    assert (indices.diff(dim=1) > 0).all(), "spatial order: increasing merged-grid ids"
    for b, (want, ids, margin) in enumerate(refs):
        assert margin > 1e-4, "a near-tie: the reference cannot decide the kept groups"
        assert torch.equal(indices[b], ids)
        torch.testing.assert_close(tokens[b], own[b, indices[b]], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tokens[b], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_inner_pruning_keeps_whole_groups_as_the_plain_reference_does(tower: str) -> None:
    model = TOWERS[tower]()
    images = _images(model)
    encoder = colln.prune(model, keep=(0.6, 0.4), layers=(1,), output="tokens")
    with torch.no_grad():
        tokens, indices, _ = encoder(images)
        for b in range(len(images)):
            want, ids, margin = reference(model, images[b], _ks(encoder))
            assert margin > 1e-4, "a near-tie: the reference cannot decide the kept groups"
            assert torch.equal(indices[b], ids)
            torch.testing.assert_close(tokens[b], want, atol=1e-4, rtol=1e-4)


def test_a_wrong_group_layout_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patches left in raster order, so that a "group" is a run of k*k patches of one row instead of
    a k x k square: the reference tells."""
    from colln.models import adapters

    model = qwen()
    images = _images(model)
    encoder = colln.prune(model, keep=(0.6, 0.4), layers=(1,), output="tokens")
    with torch.no_grad():
        refs = [reference(model, images[b], _ks(encoder)) for b in range(len(images))]
        want = torch.stack([r[0] for r in refs])
        torch.testing.assert_close(encoder(images)[0], want, atol=1e-4, rtol=1e-4)

        def raster(self, m, images):
            x, table = self.patches(m, images)
            return x, adapters.Positions(table)

        monkeypatch.setattr(adapters.QwenTower, "embed", raster)
        tokens, indices, _ = encoder(images)
        ids = torch.stack([r[1] for r in refs])
        assert not torch.equal(indices, ids) or (tokens - want).abs().max() > 0.05 * want.abs().max()


def test_exported_tower_has_positions_and_onnxruntime_agrees(tmp_path: Path) -> None:
    """The smallest family here (Qwen3-VL's tower, tiny) exported with inner pruning: tokens,
    indices and positions; ONNX Runtime gives what PyTorch gives, and validation passes."""
    from colln.data import ValImages
    from colln.export.artifact import export_into
    from colln.export.spec import ExportSpec
    from colln.infer.runners import kept_onnxruntime_runner, onnxruntime_runner
    from colln.verify.validate import validate

    model = qwen()
    images = _images(model, 8)
    config = colln.PruneConfig(keep=(0.6, 0.4), layers=(1,), output="tokens")
    exported = export_into(ExportSpec("qwen3_vit_tiny", pruning=config), tmp_path, unpruned=model)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    assert [o.name for o in session.get_outputs()] == ["tokens", "indices", "positions"]
    got = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        want = exported.pruned(images)
    np.testing.assert_array_equal(got[1], want[1].numpy())
    np.testing.assert_array_equal(got[2], want[2].numpy())
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4)
    report = validate(
        exported.pruned,
        model,
        onnxruntime_runner(tmp_path / "model.onnx"),
        ValImages(images.numpy(), None, "random"),
        observer=kept_onnxruntime_runner(tmp_path / "model.onnx", exported.plan.pruned_layers),
        random_weights=True,
    )
    assert report.passed and report.kept_sets_observed, report.mismatches


def test_exported_tower_runs_on_openvino(tmp_path: Path) -> None:
    """The tiny Qwen3-VL tower with inner pruning as an OpenVINO IR (fp32): validated against
    PyTorch with the kept sets OpenVINO really chose, and its positions are PyTorch's."""
    pytest.importorskip("openvino")
    from colln.data import ValImages
    from colln.export.artifact import export_into
    from colln.export.openvino import IR_FILE, write_ir
    from colln.export.spec import ExportSpec
    from colln.verify.validate import validate_backend

    model = qwen()
    images = _images(model, 8)
    config = colln.PruneConfig(keep=(0.6, 0.4), layers=(1,), output="tokens")
    exported = export_into(ExportSpec("qwen3_vit_tiny", pruning=config, weights="random"), tmp_path, unpruned=model)
    write_ir(tmp_path, "fp32")
    report = validate_backend(tmp_path, "openvino", exported.pruned, model, ValImages(images.numpy(), None, "random"))
    assert report.passed and report.kept_sets_observed, report.mismatches
    import openvino

    compiled = openvino.Core().compile_model(str(tmp_path / IR_FILE), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(images.numpy())
    with torch.no_grad():
        want = exported.pruned(images)
    np.testing.assert_array_equal(got[compiled.output("positions")], want[2].numpy())


def test_gemma_tower_with_clipping_linears_exports_and_onnxruntime_agrees(tmp_path: Path) -> None:
    """Gemma 4's E2B/E4B towers clamp every linear's input and output by buffers; q, k and v clamp
    one input, which the ONNX optimizer's Clip fusion used to leave reading missing bounds (the
    checker rejected the graph). Bounds that really clip here: ONNX Runtime gives what PyTorch
    gives, and the model keeps its buffers after the export."""
    from timm.models.gemma4_vit import Gemma4ClippableLinear

    from colln.export.artifact import export_into
    from colln.export.spec import ExportSpec

    model = gemma(use_clipped_linears=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Gemma4ClippableLinear):
                for name, bound in (("input_min", -0.8), ("input_max", 0.8), ("output_min", -1.0), ("output_max", 1.0)):
                    getattr(m, name).fill_(bound)
    images = _images(model, 4)
    config = colln.PruneConfig(keep=(0.6, 0.4), layers=(1,), output="tokens")
    pruned = ExportSpec("gemma4_vit_tiny", pruning=config).apply(model)
    buffers = {name: b.clone() for name, b in pruned.named_buffers()}
    exported = export_into(ExportSpec("gemma4_vit_tiny", pruning=config), tmp_path, unpruned=model)
    got = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"images": images.numpy()})
    with torch.no_grad():
        want = exported.pruned(images)
        for m in exported.pruned.modules():
            if isinstance(m, Gemma4ClippableLinear):
                m.use_clipped = False
        unclamped = exported.pruned(images)[0]
    assert (unclamped - want[0]).abs().max() > 1.0, "the bounds clip: the test sees the clamps"
    np.testing.assert_array_equal(got[1], want[1].numpy())
    np.testing.assert_array_equal(got[2], want[2].numpy())
    np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-4, atol=1e-4)
    after = dict(exported.pruned.named_buffers())
    assert after.keys() == buffers.keys() and all(torch.equal(after[k], b) for k, b in buffers.items())


class _Float64(torch.nn.Module):
    """A pruned model run in float64 (fp32 in, fp32 out): a backend without rounding error;
    ``smallest`` keeps the lowest-scored groups instead (a wrong graph)."""

    def __init__(self, pruned: torch.nn.Module, smallest: bool = False) -> None:
        super().__init__()
        self.exact = copy.deepcopy(pruned).double()
        self.colln_plan, self.pretrained_cfg, self.smallest = pruned.colln_plan, pruned.pretrained_cfg, smallest

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from colln.models import ops

        with pytest.MonkeyPatch.context() as patch:
            if self.smallest:
                patch.setattr(ops, "topk_indices", lambda s, k: torch.topk(s, k, largest=False).indices)
            return self.exact(x.double())


def test_gemma_tower_fp32_rounding_is_a_near_tie_not_a_mismatch() -> None:
    """Gemma 4's attention is unscaled on normalized q and k: sharp attention (q/k norm gains 2.2
    here) amplifies fp32 rounding through the blocks until PyTorch's own fp32 scores err ~1e-3 of
    the top score, as a random-weight gemma4_vit_167m_enc's do (7e-4). A backend that computes
    exactly (the model in float64) then keeps another group than fp32 PyTorch on an image, within
    fp32's error of the k-th score but beyond tie_rtol (1e-4): a near-tie, not a mismatch. (Its
    tokens also differ from fp32's by more than logit_rtol on some images: the output limits are not
    widened, only the selections are judged here.) A graph that keeps the lowest-scored groups fails."""
    from colln.data import ValImages
    from colln.export.spec import ExportSpec
    from colln.infer.runners import TorchRunner
    from colln.verify.validate import FP32_TIE_FACTOR, validate

    model = gemma(depth=6)
    model.pretrained_cfg = {"input_size": (3, 64, 64), "mean": (0.0,) * 3, "std": (1.0,) * 3}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(2.2)
    pruned = ExportSpec("gemma4_vit_tiny", pruning=colln.PruneConfig(keep=0.5, output="tokens")).apply(model)
    images = ValImages(torch.rand(60, 3, 64, 64, generator=torch.Generator().manual_seed(5)).numpy(), None, "random")
    report = validate(pruned, model, TorchRunner(_Float64(pruned), name="float64"), images, random_weights=True)
    (layer,) = report.layers
    assert not any("tie band" in m for m in report.mismatches), report.mismatches
    assert layer.diverged_here >= 1 and layer.explained == layer.diverged_here, report.mismatches
    assert layer.fp32_score_error > 5e-4 and layer.max_tie_band == pytest.approx(FP32_TIE_FACTOR * layer.fp32_score_error)
    wrong = validate(pruned, model, TorchRunner(_Float64(pruned, smallest=True), name="smallest"), images)
    assert not wrong.passed and "outside PyTorch's tie band" in wrong.mismatches[0]


@pytest.mark.parametrize(
    "make, settings, message",
    [
        (qwen, {"keep": 0.5}, "is a VLM tower without a classifier head: use --output tokens"),
        (qwen, {"keep": 0.5, "output": "dense"}, "--output dense is not supported"),
        (qwen, {"keep": 0.5, "output": "tokens", "merge": True}, "keeps whole 2x2 groups"),
        (gemma, {"keep": 1.0, "output": "tokens", "tome": 2}, "cannot be combined with --output tokens"),
        (lambda: qwen(img_size=20), {"keep": 0.5, "output": "tokens"}, "5x5 patch grid does not split into"),
    ],
)
def test_refusals_are_one_line(make, settings: dict, message: str) -> None:
    with pytest.raises(colln.CollnError, match=re.escape(message)) as err:
        colln.prune(make(), **settings)
    assert "\n" not in str(err.value)


def test_gemma_classifier_grouped_query_keys_merge_and_keep_one() -> None:
    """Without the pool (the classifier) a Gemma 4 tower prunes and merges per patch: its keys,
    [B, N, H_kv, D] out of k_norm with one kv head, feed the merge; keep 1.0 is the classifier's own."""
    model = gemma(gemma4_vit.Gemma4VitClassifier, num_classes=5)
    images = _images(model)
    with torch.no_grad():
        torch.testing.assert_close(colln.prune(model, keep=1.0)(images), model(images), atol=1e-5, rtol=1e-5)
        merged = colln.prune(model, keep=0.5, layers=(1,), merge=True)
        with colln.record_selections(merged) as selections:
            assert merged(images).shape == (3, 5)
    assert selections[0].indices.shape == (3, 32) and selections[0].merge_margin is not None


def test_every_tower_is_accepted_or_refused_as_the_docs_say() -> None:
    """Every model of timm's VLM tower modules on the meta device, with --output tokens and inner
    pruning: at least 90% accepted, each refusal in docs/vlm.md with its reason, the table there."""
    found = list(coverage.verdicts(coverage.TOWER_MODULES))
    accepted = sum(v.accepted for v in found)
    assert accepted / len(found) >= 0.9, f"{accepted} of {len(found)} accepted"
    assert coverage.undocumented(found, DOCS.read_text()) == []
