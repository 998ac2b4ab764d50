"""Reliability: no command deletes what it did not write, interrupted runs leave nothing behind,
exit codes mean what the README says, artifacts are honest (issue 14). Real files, real signals,
real subprocesses; the serving side is in test_serve.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colln.app import bench_cli, build_cli, export_cli, serve_cli, triton_cli, validate_cli, viz_cli
from colln.app.cli import INTERNAL_ERROR, ArgumentParser, run_main
from colln.data import open_image
from colln.errors import ExportDirError, OutputExistsError, TritonRepoError, WeightsError
from colln.export.artifact import read_export
from colln.export.spec import ExportSpec
from colln.export.triton import write_model_repository
from colln.files import atomic_dir
from colln.models.registry import read_state_dict

BIN = Path(sys.executable).parent


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# -- --force replaces only what colln wrote ---------------------------------------------------------


def test_force_replaces_only_colln_output_or_an_empty_dir(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    refused = pytest.raises(OutputExistsError, match=r"has no export\.json, so colln did not write it")
    with refused, atomic_dir(home, force=True, marker="export.json") as tmp:
        (tmp / "export.json").write_text("{}")
    assert (home / "thesis.tex").read_text() == "years of work" and leftovers(tmp_path) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty, force=True, marker="results.json") as tmp:
        (tmp / "results.json").write_text("1")
    with atomic_dir(empty, force=True, marker="results.json") as tmp:  # now colln's own: replaced
        (tmp / "results.json").write_text("2")
    assert (empty / "results.json").read_text() == "2" and leftovers(tmp_path) == []


def test_force_never_replaces_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "export.json").write_text("{}")
    monkeypatch.chdir(export)
    assert export_cli.main(["digits_vit", "--out", ".", "--force"]) == 2
    assert "is the current directory or holds it" in capsys.readouterr().err
    assert export_cli.main(["digits_vit", "--out", str(tmp_path), "--force"]) == 2
    assert (export / "export.json").is_file()


def test_symlinked_output_replaces_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir()
    (target / "export.json").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(target)
    with atomic_dir(link, force=True, marker="export.json") as tmp:
        (tmp / "export.json").write_text("new")
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (link / "export.json").read_text() == "new" and leftovers(tmp_path) == []


def _writer(out: str, index: int) -> None:
    # Many short writes each: a writer's pre-check then often meets another's swap (out missing).
    for _ in range(15):
        with atomic_dir(Path(out), force=True, marker="export.json") as tmp:
            (tmp / "export.json").write_text(str(index))
            (tmp / "model.onnx").write_bytes(bytes([index]) * 100_000)


def test_concurrent_writers_to_one_output_all_succeed_and_leave_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_writer, args=(str(out), i)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
    index = int((out / "export.json").read_text())
    assert (out / "model.onnx").read_bytes() == bytes([index]) * 100_000  # one writer's whole output
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temp_dirs_of_dead_runs_are_removed_by_the_next_run(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    ).stdout.strip()
    for name in (f".out.tmp-{dead}-abc", f".out.old-{dead}-def", f".out.tmp-{os.getppid()}-alive"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"partial")
    with atomic_dir(tmp_path / "out", marker="export.json") as tmp:
        (tmp / "export.json").write_text("{}")
    # The live process's temp dir is its own business; the dead ones are gone.
    assert leftovers(tmp_path) == [f".out.tmp-{os.getppid()}-alive"]


# -- interrupted exports ---------------------------------------------------------------------------


def _start_export(out: Path, log: Path) -> subprocess.Popen:
    argv = [str(BIN / "colln-export"), "digits_vit", "--weights", "bundled", "--out", str(out), "--force", "--no-latency"]
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for_temp(proc: subprocess.Popen, parent: Path, name: str, settle: float = 0.5) -> None:
    """Until the export writes its temp dir, then ``settle`` seconds more (the model loads and is
    pruned within a second; digits_vit's ONNX export takes several)."""
    deadline = time.monotonic() + 120
    while not list(parent.glob(f".{name}.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(parent.glob(f".{name}.tmp-*")), "the export never started writing"
    time.sleep(settle)


@pytest.mark.parametrize(
    ("sig", "at_onnx_step"),
    [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGINT, True)],
    ids=["SIGTERM", "SIGHUP", "SIGINT-during-onnx-export"],
)
def test_signals_exit_130_and_leave_the_old_export(digits_export: Path, tmp_path: Path, sig: int, at_onnx_step: bool) -> None:
    out = tmp_path / "export"
    shutil.copytree(digits_export, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    log = tmp_path / "log"
    proc = _start_export(out, log)
    _wait_for_temp(proc, tmp_path, "export", settle=2.0 if at_onnx_step else 0.5)
    proc.send_signal(sig)
    # A signal during the ONNX exporter's native call acts when the exporter returns (colln.files.
    # interrupts_held): on a loaded machine that alone can take a minute.
    assert proc.wait(300) == 130, log.read_text()[-2000:]
    assert log.read_text().strip().splitlines()[-1] == "colln: error: interrupted"  # no colour codes, no traceback
    if at_onnx_step:
        assert "done pruning and exporting" not in log.read_text(), "the signal came after the ONNX step"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_sigkill_leaves_a_temp_dir_that_the_next_run_removes(tmp_path: Path) -> None:
    out = tmp_path / "export"
    proc = _start_export(out, tmp_path / "log")
    _wait_for_temp(proc, tmp_path, "export")
    proc.kill()
    proc.wait(30)
    stale = leftovers(tmp_path)
    assert stale and stale[0].startswith(f".export.tmp-{proc.pid}-")
    with atomic_dir(out, marker="export.json") as tmp:  # what the next colln-export enters first
        (tmp / "export.json").write_text("{}")
    assert leftovers(tmp_path) == []


# -- Triton model names ----------------------------------------------------------------------------


def test_triton_names_cannot_leave_the_repository(digits_export: Path, tmp_path: Path, capsys) -> None:
    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"')
    for name in (".", "..", "a/b", "../escape", ".hidden", "-rf", "x" * 300):
        assert triton_cli.main([str(digits_export), str(repo), f"--name={name}"]) == 2
        assert capsys.readouterr().err.startswith("colln: error: arguments: Triton model name")
    outside = tmp_path / "outside"
    outside.mkdir()
    (repo / "linked").symlink_to(outside)
    with pytest.raises(TritonRepoError, match="is a symlink"):
        write_model_repository(digits_export, repo, name="linked")
    (repo / "notes").mkdir()
    (repo / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=r"has no config\.pbtxt"):
        write_model_repository(digits_export, repo, name="notes")
    assert write_model_repository(digits_export, repo, name="digits") == repo / "digits"
    assert write_model_repository(digits_export, repo, name="digits") == repo / "digits"  # its own: replaced
    assert sorted(p.name for p in repo.iterdir()) == ["digits", "linked", "notes", "other"]
    assert (repo / "notes" / "todo.txt").read_text() == "keep me" and list(outside.iterdir()) == []


# -- exit codes ------------------------------------------------------------------------------------


def test_internal_error_is_one_line_naming_a_log_with_the_traceback(capsys) -> None:
    def broken(args: object) -> int:
        return {}["no such key"]

    assert run_main(broken, ArgumentParser(prog="colln-test"), []) == INTERNAL_ERROR == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("colln: error: internal: KeyError")
    log = Path(err[0].split("the traceback is in ", 1)[1].split(";", 1)[0])
    assert "Traceback" in log.read_text() and "no such key" in log.read_text()
    log.unlink()


def test_disk_full_is_exit_2_with_a_clear_line(capsys) -> None:
    def fill(args: object) -> int:
        with open("/dev/full", "wb") as f:  # the kernel's always-full device: a real ENOSPC
            f.write(b"x" * 1_000_000)
            f.flush()
        return 0

    assert run_main(fill, ArgumentParser(prog="colln-test"), []) == 2
    assert capsys.readouterr().err.strip() == "colln: error: system: the disk is full: free some space and run it again"


def test_bad_paths_and_arguments_are_one_line_exit_2(digits_export: Path, tmp_path: Path, capsys) -> None:
    cases = [
        (validate_cli.main, [os.fsdecode(str(tmp_path).encode() + b"/caf\xe9")]),  # not UTF-8
        (validate_cli.main, [str(tmp_path / ("x" * 5000))]),  # longer than NAME_MAX
        (bench_cli.main, [str(digits_export), "--rounds", "0"]),
        (export_cli.main, ["digits_vit", "--latency-batches", "-1", "--out", str(tmp_path / "e")]),
        (export_cli.main, ["digits_vit", "--latency-batches", "0", "--out", str(tmp_path / "e")]),
        (export_cli.main, ["digits_vit", "--latency-rounds", "0", "--out", str(tmp_path / "e")]),
        (serve_cli.main, [str(digits_export), "--max-batch", "0"]),
    ]
    for main, argv in cases:
        started = time.monotonic()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("colln: error: ") and "Traceback" not in err[0], err
        assert time.monotonic() - started < 20, f"{argv} was refused only after the work"
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated"])
def test_validate_and_bench_refuse_a_damaged_model_onnx(digits_export: Path, tmp_path: Path, capsys, damage: str) -> None:
    export = tmp_path / "export"
    shutil.copytree(digits_export, export)
    model = export / "model.onnx"
    if damage == "missing":
        model.unlink()
    else:
        model.write_bytes(b"" if damage == "empty" else model.read_bytes()[:5000])
    for main in (validate_cli.main, bench_cli.main):
        assert main([str(export)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("colln: error: export-dir:"), err


def _commands_reading(
    export: Path,
    tmp_path: Path,
) -> list[tuple[object, list[str]]]:
    """Every command that reads an export directory, as (main, argv)."""
    return [
        (validate_cli.main, [str(export)]),
        (bench_cli.main, [str(export)]),
        (build_cli.main, [str(export)]),
        (triton_cli.main, [str(export), str(tmp_path / "repo")]),
        (serve_cli.main, [str(export)]),
    ]


def test_every_command_refuses_an_export_json_that_does_not_match_model_onnx(digits_export: Path, tmp_path: Path, capsys) -> None:
    export = tmp_path / "export"
    shutil.copytree(digits_export, export)
    spec = json.loads((export / "export.json").read_text())
    spec["plan"]["keep_counts"] = [k - 1 for k in spec["plan"]["keep_counts"]]
    (export / "export.json").write_text(json.dumps(spec))
    for main, argv in _commands_reading(export, tmp_path):
        assert main(argv) == 2, argv
        assert "does not carry the keep plan of its export.json" in capsys.readouterr().err, argv


@pytest.mark.parametrize(
    ("field", "value"),
    [("pruning.keep", 0.5), ("pruning.metric", "cls"), ("pruning.output", "tokens"), ("precision", "fp16"), ("opset", 17)],
)
def test_every_command_refuses_an_edited_field_the_graph_determines(
    field: str, value: object, digits_export: Path, tmp_path: Path, capsys
) -> None:
    """An edited keep (or precision, ...) with the plan left alone: a damaged export (exit 2), never
    a keep-0.7 graph labelled keep0.5 or validated at fp16 tolerances."""
    export = tmp_path / "export"
    shutil.copytree(digits_export, export)
    spec = json.loads((export / "export.json").read_text())
    where, _, key = field.rpartition(".")
    (spec[where] if where else spec)[key] = value
    (export / "export.json").write_text(json.dumps(spec))
    for main, argv in _commands_reading(export, tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("colln: error: export-dir:") and f"({field} differ)" in err[0], (argv, err)


def test_a_moved_weights_file_is_not_an_edited_export(tmp_path: Path) -> None:
    """The weights' path is where the file lies, not what the graph is: it may be edited (the hash
    may not). An fp16 graph keeps what it was exported with through the conversion."""
    from safetensors.torch import save_file

    from colln.export.artifact import export_into
    from colln.models.registry import load_model

    weights = tmp_path / "w.safetensors"
    save_file(load_model("digits_vit", "bundled").state_dict(), str(weights))
    export = tmp_path / "export"
    export.mkdir()
    export_into(ExportSpec(model="digits_vit", weights=str(weights), precision="fp16"), export)
    spec = json.loads((export / "export.json").read_text())
    moved = tmp_path / "moved.safetensors"
    weights.rename(moved)
    spec["weights"] = str(moved)
    (export / "export.json").write_text(json.dumps(spec))
    assert read_export(export).weights == str(moved)
    for key, value in (("weights_sha256", "0" * 64), ("precision", "fp32")):
        (export / "export.json").write_text(json.dumps({**spec, key: value}))
        with pytest.raises(ExportDirError, match=rf"\({key} differ\)"):
            read_export(export)


# -- honest artifacts and inputs ---------------------------------------------------------------------


def test_opset_17_is_written_as_17_or_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "op17"
    code = export_cli.main(["digits_vit", "--weights", "bundled", "--opset", "17", "--out", str(out), "--no-latency"])
    if code == 0:
        import onnx

        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    else:
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("colln: error: export: the ONNX exporter produced opset 18, not the requested 17")
        assert not out.exists() and leftovers(tmp_path) == []


def test_weights_are_stored_absolute_with_sha256_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    from colln.models.registry import load_model

    monkeypatch.chdir(tmp_path)
    save_file(load_model("digits_vit", "bundled").state_dict(), "w.safetensors")
    spec = ExportSpec(model="digits_vit", weights="w.safetensors")
    assert spec.weights == str(tmp_path / "w.safetensors") and len(spec.weights_sha256) == 64
    again = ExportSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    monkeypatch.chdir("/")
    again.load_unpruned()  # from another directory: same file, same hash
    with open(tmp_path / "w.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    with pytest.raises(WeightsError, match="changed since the export"):
        again.load_unpruned()


def test_a_pickled_whole_model_is_named_as_such(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(WeightsError, match=r"pickled whole model \(torch\.nn\.modules\.linear\.Linear\).*state_dict"):
        read_state_dict(tmp_path / "model.pt")


def test_16_bit_and_float_images_keep_their_brightness(tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(ramp.astype(np.float32), mode="F").save(tmp_path / "float.tiff")
    for name in ("deep.png", "float.tiff"):
        with Image.open(tmp_path / name) as raw:
            assert raw.mode in ("I", "I;16", "F"), raw.mode
        gray = np.asarray(open_image(tmp_path / name))[..., 0].astype(float)
        assert abs(gray.mean() - 127.5) < 3 and gray.min() == 0 and gray.max() == 255, name


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (PIL checks the size on open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_image_is_a_data_error(tmp_path: Path, capsys) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(40_000, 40_000))
    assert viz_cli.main(["digits_vit", "--image", str(bomb), "--out", str(tmp_path / "viz.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("colln: error: data: image") and "too large to decode safely" in err[0]


def test_nan_weights_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    from colln.models.registry import load_model

    state = {k: v.clone() for k, v in load_model("digits_vit", "bundled").state_dict().items()}
    state["head.weight"][0, 0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    out = tmp_path / "out"
    assert export_cli.main(["digits_vit", "--weights", str(tmp_path / "nan.safetensors"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("colln: error: weights: ") and "holds NaN or Inf in 1 tensors (first: head.weight)" in err[-1]
    assert not out.exists() and leftovers(tmp_path) == []


def test_every_command_module_has_one_shape() -> None:
    """The nine console scripts: build_parser() -> ArgumentParser, run(args) -> int, main made by
    entry_point (the one place exit codes and error lines are made)."""
    import importlib
    import inspect

    import tomllib

    from colln.app.cli import entry_point

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) == 9
    for script, target in scripts.items():
        module_name, _, attr = target.partition(":")
        module = importlib.import_module(module_name)
        assert attr == "main" and module.main.__qualname__ == entry_point(None, None).__qualname__, script
        assert isinstance(module.build_parser(), ArgumentParser) and module.build_parser().prog == script
        assert list(inspect.signature(module.run).parameters) == ["args"], script
        assert inspect.signature(module.run).return_annotation in (int, "int"), script


def test_out_of_memory_is_exit_2_saying_what_to_do(capsys) -> None:
    """A real failed allocation (numpy's MemoryError), and a runtime's own words for one behind a
    colln error (OpenVINO's compile: ``std::bad_alloc``): one line, exit 2, not "please report it"."""

    def allocate(args: object) -> int:
        np.empty(2**62, dtype=np.uint8)
        return 0

    def compile_fails(args: object) -> int:
        try:
            raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:112:\nstd::bad_alloc")
        except RuntimeError as exc:
            raise ExportDirError("OpenVINO's CPU plugin cannot compile the graph: std::bad_alloc") from exc

    fix = (
        "run it with smaller batches (or a smaller model), or free memory or raise the limit (ulimit -v, the container's memory)"
    )
    assert run_main(allocate, ArgumentParser(prog="colln-test"), []) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("colln: error: memory: out of memory (Unable to allocate 4.00 EiB") and err.endswith(fix), err
    assert run_main(compile_fails, ArgumentParser(prog="colln-test"), []) == 2
    assert capsys.readouterr().err.strip() == f"colln: error: memory: out of memory (std::bad_alloc): {fix}"


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT], ids=["SIGHUP", "SIGTERM", "SIGINT"])
def test_an_interrupt_during_the_onnx_export_acts_when_the_exporter_returns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sig: int
) -> None:
    """torch.export calls Python from C++: a KeyboardInterrupt raised inside it can abort the
    process (``terminate called after throwing an instance of 'python_error'``, exit 134, a temp
    dir left; once in ~20 SIGHUPs). The signal acts when the exporter returns, as the CLI handles it
    (KeyboardInterrupt: exit 130, temp output removed); a second one acts at once."""
    from colln.app.cli import interrupt_on_termination
    from colln.export.onnx import export_onnx

    reached: list[str] = []

    def exporter(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), sig)
        reached.append("after the signal")  # a callback the C++ side runs on
        return None

    monkeypatch.setattr(torch.onnx, "export", exporter)
    with interrupt_on_termination(), pytest.raises(KeyboardInterrupt):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "model.onnx", (3, 8, 8))
    assert reached == ["after the signal"]

    def insisted(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), sig)
        reached.append("after the second signal")

    monkeypatch.setattr(torch.onnx, "export", insisted)
    with interrupt_on_termination(), pytest.raises(KeyboardInterrupt):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "model.onnx", (3, 8, 8))
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are back


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--merge-weight", "size"], "--merge-weight does nothing without --merge: add --merge, or leave it out"),
        (["--no-prop-attn"], "--no-prop-attn does nothing without --merge or --tome: leave it out"),
        (["--tome", "8", "--metric", "cls"], "--metric cls does nothing with --tome (ToMe matches keys, it scores no tokens)"),
        (["--tome", "8", "--round-to", "8"], "--round-to does nothing with --tome"),
        (["--tome", "8", "--spatial-order"], "--spatial-order does nothing with --tome"),
        (["--precision", "fp16", "--openvino"], "--openvino takes an fp32 or int8 export, not --precision fp16"),
    ],
    ids=["merge-weight", "no-prop-attn", "tome-metric", "tome-round-to", "tome-spatial-order", "fp16-openvino"],
)
def test_options_that_would_do_nothing_are_refused_in_one_line(tmp_path: Path, capsys, argv: list[str], said: str) -> None:
    out = tmp_path / "e"
    assert export_cli.main(["digits_vit", *argv, "--no-validate", "--no-latency", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"colln: error: arguments: {said}"), err
    assert "--openvino-precision fp16" not in err[0] and not out.exists()


def test_an_unusable_out_gets_its_real_reason(tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    for out, reason in (
        (tmp_path / "afile" / "sub", f"cannot write {tmp_path / 'afile'} ({tmp_path / 'afile'} is a file, not a directory)"),
        (tmp_path / "afile" / "a" / "b", f"({tmp_path / 'afile'} is a file, not a directory)"),
        (Path("/proc/x"), "cannot write /proc (it exists, and new files cannot be created in it)"),
    ):
        assert export_cli.main(["digits_vit", "--no-validate", "--no-latency", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("colln: error: output: ") and reason in err, err


def test_colln_triton_suggests_no_option_it_lacks(digits_export: Path, tmp_path: Path, capsys) -> None:
    repo = tmp_path / "repo"
    (repo / "notes").mkdir(parents=True)
    (repo / "notes" / "todo.txt").write_text("keep me")
    assert triton_cli.main([str(digits_export), str(repo), "--name", "notes"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no config.pbtxt, so colln did not write it" in err and "choose another REPO" in err
    assert "--force" not in err and "--force" not in triton_cli.build_parser().format_help()


def test_tome_plans_say_clamped_only_where_r_was_clamped(trained_digits_vit) -> None:
    """digits_vit: 65 tokens; r 4 at its 8 blocks leaves 37 at the last (18 pairs: no clamp), r 8
    leaves 9 entering block 7, whose 8 candidates merge at most 4."""
    from colln.models.config import PruneConfig
    from colln.models.rewrite import plan_for
    from colln.report.render import plan_line

    assert "clamped" not in plan_line(plan_for(trained_digits_vit, PruneConfig(keep=1.0, tome=4)).to_dict())
    line = plan_line(plan_for(trained_digits_vit, PruneConfig(keep=1.0, tome=8)).to_dict())
    assert "r [8, 8, 8, 8, 8, 8, 8, 4] (clamped to half the tokens at blocks [7])" in line, line


def test_colln_serve_warns_of_an_export_that_failed_validation(digits_export: Path, tmp_path: Path) -> None:
    export = shutil.copytree(digits_export, tmp_path / "export")
    assert serve_cli.failed_validation(export, "onnxruntime") is None  # passed
    report = json.loads((export / "report.json").read_text())
    report["validation"]["passed"] = False
    (export / "report.json").write_text(json.dumps(report))
    assert serve_cli.failed_validation(export, "onnxruntime") == (
        f"warning: {export} failed its onnxruntime validation against PyTorch ({export / 'report.json'}): serving it anyway"
    )
    assert serve_cli.failed_validation(export, "openvino") is None  # no OpenVINO validation in this export
