"""Paths this user may not write: every command refuses in one line (exit 2) before its long work,
writes nothing and leaves what was there; a default timing cache that cannot be written only costs
the cache. Real permissions: root ignores them, so as root the commands run as the unprivileged
user ``nobody`` (setpriv); as another user they run as that user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from colln.app.export_cli import main as export_main
from colln.export.spec import file_sha256
from colln.models import bundled

BIN = Path(sys.executable).parent
NOBODY = "65534"
READ_ONLY = 0o555


def _as_user() -> list[str]:
    """The command prefix that drops root's privileges (empty when not root)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop privileges to test permissions")
    return [setpriv, "--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"]


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.fixture(scope="module")
def area(digits_weights: str) -> Iterator[Path]:
    """A scratch dir everyone may enter (pytest's own are private to their owner) with ``ro/``
    (read-only, empty), ``exp/`` (a read-only export), ``w/`` (writable: home, caches, a
    writable copy of the export, a digit image)."""
    root = Path(tempfile.mkdtemp(prefix="colln-permissions-", dir="/tmp"))
    root.chmod(0o777)
    writable = root / "w"
    writable.mkdir(mode=0o777)
    writable.chmod(0o777)
    argv = ["digits_vit", "--keep", "0.7", "--weights", digits_weights, "--no-latency", "--out", str(root / "exp")]
    assert export_main(argv) == 0
    shutil.copytree(root / "exp", writable / "exp")
    bundled.load_split("test").images[0].save(writable / "digit.png")
    for path in writable.rglob("*"):
        path.chmod(0o777 if path.is_dir() else 0o666)
    (root / "ro").mkdir()
    (root / "ro").chmod(READ_ONLY)
    (root / "exp").chmod(READ_ONLY)
    probe = subprocess.run([*_as_user(), sys.executable, "-c", "import colln"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"the unprivileged user cannot run this checkout's Python: {probe.stderr.strip()[-200:]}")
    yield root
    for directory in (root / "ro", root / "exp"):
        directory.chmod(0o755)
    shutil.rmtree(root)


def _run(
    area: Path,
    command: str,
    *args: str,
    home: Path | None = None,
) -> subprocess.CompletedProcess:
    home = home or area / "w"
    env = {**os.environ, "HOME": str(home), "MPLCONFIGDIR": str(area / "w" / "mpl"), "OMP_NUM_THREADS": "1"}
    env.pop("XDG_CACHE_HOME", None)
    argv = [*_as_user(), str(BIN / command), *args]
    return subprocess.run(argv, cwd=area / "w", env=env, capture_output=True, text=True, timeout=300, check=False)


CASES = {
    "export --out": (["colln-export", "digits_vit", "--keep", "0.7", "--no-latency", "--out", "{ro}/x"], "{ro}", "--out"),
    "export --force": (
        ["colln-export", "digits_vit", "--keep", "0.7", "--no-latency", "--force", "--out", "{exp}"],
        "{exp}",
        "it cannot be replaced by this user",
    ),
    "bench --json": (["colln-bench", "{w}/exp", "--batch", "1", "--json", "{ro}/b.json"], "{ro}/b.json", "writable path"),
    "bench --cache": (["colln-bench", "{w}/exp", "--batch", "1", "--cache", "{ro}/cache"], "{ro}/cache", "--cache"),
    "validate --json": (["colln-validate", "{w}/exp", "--json", "{ro}/v.json"], "{ro}/v.json", "writable path"),
    "build into a read-only export": (["colln-build", "{exp}"], "{exp}", "writes model.plan into the export directory"),
    "build --timing-cache": (["colln-build", "{w}/exp", "--timing-cache", "{ro}/t.cache"], "{ro}", "--timing-cache"),
    "triton REPO": (["colln-triton", "{exp}", "{ro}"], "{ro}", "writable REPO"),
    "eval --out": (["colln-eval", "digits_vit", "--keep", "0.5", "--limit", "20", "--out", "{ro}/e"], "{ro}", "--out"),
    "viz --out": (["colln-viz", "digits_vit", "--image", "{w}/digit.png", "--out", "{ro}/k.png"], "{ro}/k.png", "writable path"),
    "finetune --out": (["colln-finetune", "digits_vit", "--keep", "0.7", "--out", "{ro}/ft"], "{ro}/ft", "--out"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_path_this_user_cannot_write_is_refused_in_one_line_and_nothing_changes(area: Path, case: str) -> None:
    argv, path, fix = CASES[case]
    names = {"ro": area / "ro", "exp": area / "exp", "w": area / "w"}
    export_before = _snapshot(area / "exp")
    proc = _run(area, *[a.format(**names) for a in argv])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("colln: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors[0].startswith(f"colln: error: output: cannot write {path.format(**names)} ("), errors[0]
    assert fix in errors[0], errors[0]
    assert list((area / "ro").iterdir()) == []
    assert _snapshot(area / "exp") == export_before
    assert [p.name for p in area.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


def test_a_default_timing_cache_that_cannot_be_written_only_costs_the_cache(area: Path) -> None:
    pytest.importorskip("tensorrt_rtx", reason="colln-build needs TensorRT-RTX here: pip install 'colln[trt-rtx]'")
    export = area / "w" / "exp"
    proc = _run(area, "colln-build", str(export), home=area / "ro")  # the default cache lives under a read-only home
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"colln: warning: cannot write {area / 'ro' / '.cache' / 'colln'} (" in proc.stderr
    assert "building without a timing cache" in proc.stderr
    assert json.loads((export / "model.plan.json").read_text())["timing_cache"] is None
    assert json.loads((export / "model.plan.json").read_text())["onnx_sha256"] == file_sha256(export / "model.onnx")
    assert (export / "model.plan").is_file() and list((area / "ro").iterdir()) == []
