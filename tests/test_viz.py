"""colln-viz: kept candidate indices mapped back to patches, checked against a block-by-block forward
written out here (positions carried along with the tokens), and the figure written for real images."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from colln import load_model, prune, record_selections
from colln.app import viz_cli
from colln.data import preprocess, skimage_photos
from colln.models import bundled
from colln.report import viz

LAYERS = (0, 2, 4)
KEEP = 0.5


@pytest.fixture(scope="module")
def digits_model() -> torch.nn.Module:
    return load_model("digits_vit", "bundled")


@pytest.fixture(scope="module")
def digit_batch(digits_model) -> torch.Tensor:
    return preprocess(bundled.load_split("test").images[:6], digits_model)


def _reference(
    model: torch.nn.Module,
    x: torch.Tensor,
    metric: str,
    fuse: bool,
) -> tuple[torch.Tensor, list[list[set[int]]]]:
    """Logits and, per pruning layer and image, the set of original patches still kept.

    Each image carries a list naming the original patch of every candidate token (None for the
    fused token) that is permuted exactly like the tokens themselves.
    """
    b = x.shape[0]
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    pos = [list(range(model.patch_embed.num_patches)) for _ in range(b)]
    kept = []
    for i, blk in enumerate(model.blocks):
        if i not in LAYERS:
            t = blk(t)
            continue
        a, n = blk.attn, t.shape[1]
        q, k, v = a.qkv(blk.norm1(t)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        probs = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
        t = t + a.proj((probs @ v).transpose(1, 2).reshape(b, n, -1))
        mean = probs.mean(1)
        # Col-Ln: 4-norm of each key column over all queries; [CLS]: row 0. Candidates skip [CLS].
        scores = (mean[:, :, 1:] ** 4).sum(1) ** 0.25 if metric == "colln" else mean[:, 0, 1:]
        top = torch.topk(scores, math.ceil(KEEP * (n - 1))).indices
        rows = []
        for j in range(b):
            parts = [t[j, :1], t[j, 1:][top[j]]]
            if fuse:
                # The authors' weights: Col-Ln over the sum of every column's Col-Ln (+1e-6); raw [CLS] attention.
                all_columns = (mean[j] ** 4).sum(0) ** 0.25
                weight = scores[j] / (all_columns.sum() + 1e-6) if metric == "colln" else mean[j, 0, 1:].clone()
                weight[top[j]] = 0.0
                parts.append((weight @ t[j, 1:])[None])
            rows.append(torch.cat(parts))
            pos[j] = [pos[j][c] for c in top[j].tolist()] + ([None] if fuse else [])
        t = torch.stack(rows)
        t = t + blk.mlp(blk.norm2(t))
        kept.append([{p for p in pos[j] if p is not None} for j in range(b)])
    return model.forward_head(model.norm(t)), kept


@pytest.mark.parametrize("metric", ["colln", "cls"])
@pytest.mark.parametrize("fuse", [False, True])
def test_kept_patches_match_block_by_block_reference(digits_model, digit_batch, metric, fuse):
    pruned = prune(digits_model, keep=KEEP, layers=LAYERS, metric=metric, fuse=fuse)
    with torch.no_grad(), record_selections(pruned) as selections:
        logits = pruned(digit_batch)
        ref_logits, ref_kept = _reference(digits_model, digit_batch, metric, fuse)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for image in range(digit_batch.shape[0]):
        mapped = viz.kept_patches(selections, digits_model.patch_embed.num_patches, image=image)
        assert [layer for layer, _ in mapped] == list(LAYERS)
        for (_, got), want in zip(mapped, (per_layer[image] for per_layer in ref_kept)):
            assert len(got) == len(set(got.tolist()))
            assert set(got.tolist()) == want


def test_spatial_order_keeps_the_same_patches(digits_model, digit_batch):
    """Token order does not change what attention computes, so the kept patch sets must agree."""
    sets = []
    for spatial in (False, True):
        pruned = prune(digits_model, keep=KEEP, layers=LAYERS, metric="colln", spatial_order=spatial)
        with torch.no_grad(), record_selections(pruned) as selections:
            pruned(digit_batch)
        sets.append([[set(p.tolist()) for _, p in viz.kept_patches(selections, 64, image=i)] for i in range(6)])
    assert sets[0] == sets[1]


def test_overlay_dims_exactly_the_dropped_patches():
    img = np.random.default_rng(0).random((8, 12, 3))
    out = viz.overlay(img, np.array([0, 5]), grid=(2, 3))  # patches are 4x4, row-major
    for patch in range(6):
        r, c = divmod(patch, 3)
        block = (slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4))
        factor = 1.0 if patch in (0, 5) else viz.DIM
        np.testing.assert_allclose(out[block], img[block] * factor)


def test_cli_digit_image(tmp_path):
    image = tmp_path / "digit.png"
    bundled.load_split("test").images[0].save(image)
    out = tmp_path / "fig" / "kept.png"
    assert viz_cli.main(["digits_vit", "--image", str(image), "--keep", "0.5", "--out", str(out)]) == 0
    with Image.open(out) as png:
        assert png.format == "PNG"
        # rows: colln and cls; columns: the input and the 3 early pruning blocks of 8
        assert png.width > png.height > 400
    assert [p.name for p in out.parent.iterdir()] == ["kept.png"]


def test_cli_photo_random_weights(tmp_path, capsys):
    image = tmp_path / "astronaut.png"
    skimage_photos(["astronaut"])[0].save(image)
    out = tmp_path / "astro.png"
    argv = ["vit_tiny", "--weights", "random", "--image", str(image), "--layers", "0,3", "--metric", "colln,cls,correct"]
    assert viz_cli.main([*argv, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.format == "PNG" and png.height > 700


@pytest.mark.parametrize(
    ("argv", "stage"),
    [
        (["--image", "/nonexistent.png", "--out", "OUT.png"], "data"),
        (["--image", "IMG", "--out", "OUT.jpg"], "arguments"),
        (["--image", "IMG", "--out", "OUT.png", "--layers", "0", "--layers", "2"], "arguments"),
        (["--image", "IMG", "--out", "OUT.png", "--norm", "2,4"], "arguments"),
        (["--image", "IMG", "--out", "OUT.png", "--dpi", "5"], "arguments"),
    ],
)
def test_bad_arguments_one_line_exit_2(argv, stage, tmp_path, capsys):
    image = tmp_path / "digit.png"
    bundled.load_split("test").images[0].save(image)
    argv = [a.replace("IMG", str(image)).replace("OUT", str(tmp_path / "out")) for a in argv]
    assert viz_cli.main(["digits_vit", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"colln: error: {stage}: ") and "\n" not in err
    assert not list(tmp_path.glob("out*"))
