"""The docs stay true to the code: the README is a front page, every relative link in the README,
benchmarks/README.md and the docs site resolves (files, and anchors into markdown pages), and every
option of every ``colln-*`` command (its argparse parser, ``build_parser()``) is documented on a
docs page that names the command while a command's reference page names no option it lacks; the
tolerance table is the one validation applies. ``make docs`` (``mkdocs build --strict``) checks the
site's own links again as MkDocs renders them."""

from __future__ import annotations

import argparse
import importlib
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MAX_README_LINES = 400

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans (links there are examples)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slugify(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (what MkDocs renders with) gives a heading."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)  # code spans keep their text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = re.sub(r"(?<!\w)(\*{1,3}|_{1,3})(\S.*?)\1(?!\w)", r"\2", text)  # emphasis, not snake_case
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a markdown page, with toc's ``_1``, ``_2`` suffixes for repeats."""
    seen: set[str] = set()
    for _, heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = base = slugify(heading)
        n = 0
        while slug in seen:
            n += 1
            slug = f"{base}_{n}"
        seen.add(slug)
    return seen


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file, or anchor in a markdown file, does not exist."""
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every console script colln installs, with its parser."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]  # no tomllib on Python 3.10
    scripts = re.findall(r'^([\w-]+)\s*=\s*"([\w.]+):\w+"', section, re.M)
    return {name: importlib.import_module(module).build_parser() for name, module in scripts}


def mentions(text: str, word: str) -> bool:
    """``word`` as a whole token: ``--keep`` does not match ``--keep-foo`` or ``---keep``."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def undocumented(name: str, parser: argparse.ArgumentParser, pages: list[Path]) -> list[str]:
    """Option strings and choices of ``parser`` that none of the pages naming command ``name``
    mentions."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in pages if mentions(p.read_text(encoding="utf-8"), name))
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        missing += [option for option in action.option_strings if not mentions(text, option)]
        missing += [f"{action.option_strings[0]} {choice}" for choice in action.choices or () if not mentions(text, str(choice))]
    return missing


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_readme_is_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move reference material into docs/"
    text = README.read_text(encoding="utf-8")
    for command in ("make demo", "make test"):
        assert command in text, f"the README's quick start lost `{command}`"


@pytest.mark.parametrize(
    "page",
    [README, ROOT / "benchmarks" / "README.md", *doc_pages()],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_every_command_has_a_reference_page_with_every_option() -> None:
    pages = doc_pages()
    parsers = commands()
    assert len(parsers) >= 9  # export, validate, bench, build, eval, viz, finetune, serve, triton
    problems = {}
    for name, parser in parsers.items():
        reference = DOCS / "reference" / f"{name}.md"
        if not reference.is_file():
            problems[name] = [f"no {reference.relative_to(ROOT)}"]
        elif missing := undocumented(name, parser, pages):
            problems[name] = missing
    assert problems == {}, f"options not in the docs (docs/reference/<command>.md, or a page naming the command): {problems}"


LAUNCHER_OPTIONS = {"--nproc_per_node", "--standalone"}  # torchrun's, on colln-finetune's page


def test_reference_pages_name_only_real_options() -> None:
    stale = {}
    for name, parser in commands().items():
        options = {option for action in parser._actions for option in action.option_strings}
        page = (DOCS / "reference" / f"{name}.md").read_text(encoding="utf-8")
        named = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", page)) - LAUNCHER_OPTIONS
        if named - options:
            stale[name] = sorted(named - options)
    assert stale == {}, "options on a reference page that the command does not have"


def test_mkdocs_nav_lists_every_page() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w./-]+\.md)\s*$", config, re.M))
    on_disk = {str(p.relative_to(DOCS)) for p in doc_pages()}
    assert on_disk - listed == set(), "pages missing from mkdocs.yml's nav"
    assert listed - on_disk == set(), "mkdocs.yml's nav names pages that do not exist"


def test_tolerance_table_matches_the_code() -> None:
    from colln.verify.validate import TOLERANCES

    page = (DOCS / "reference" / "tolerances.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| ([\w-]+) \| ([\d.e-]+) \| ([\d.e-]+) · max\(1, max\\\|ref\\\|\) \| ([\d.e-]+) \| ([^|]*)\|$", page, re.M
    )
    documented = {
        precision: (float(cosine), float(rtol), float(tie), float(drop.split()[0]) / 100 if drop.strip() else None)
        for precision, cosine, rtol, tie, drop in rows
    }
    actual = {
        p: (t.min_cosine, t.logit_rtol, t.tie_rtol, t.max_accuracy_drop) for p, t in TOLERANCES.items() if not t.statistical
    }
    assert documented == actual
    # The int8 rule's table: one limit (or a median / p99 pair) per check, in the code's order.
    rule = page[page.index("## The int8 rule") :]
    cells = re.findall(r"^\| [^|]*(?:\\\|[^|]*)*\| [^|]* \| ([^|]+) \|$", rule[: rule.index("\n\n", rule.index("| check"))], re.M)
    numbers = [float(x) for cell in cells for x in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", cell)]
    int8 = TOLERANCES["int8"]
    assert TOLERANCES["int8-bf16"] == int8 and int8.statistical
    assert numbers == [
        int8.min_top1_agreement,
        100 * int8.max_accuracy_drop,
        int8.min_mean_overlap,
        int8.median_logit_rtol,
        int8.p99_logit_rtol,
        int8.median_cosine_gap,
        int8.p99_cosine_gap,
    ]


# The checkers themselves, on pages that are wrong on purpose.


def test_link_checker_finds_missing_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## The `--keep` option: rates\n\n## Twice\n\n## Twice\n")
    (tmp_path / "img.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md) [ok](other.md#the-keep-option-rates) [ok](other.md#twice_1) ![ok](img.png)\n"
        "[ok](#page) [web](https://example.com/x.md#nope)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [bad local](#nowhere)\n"
        "`[in code](missing2.md)`\n\n```\n[in a fence](missing3.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md (no such file)",
        "other.md#nope (no heading #nope in other.md)",
        "#nowhere (no heading #nowhere in page.md)",
    ]


def test_option_checker_finds_an_undocumented_option(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="colln-demo")
    parser.add_argument("--keep")
    parser.add_argument("--keep-all", action="store_true")
    parser.add_argument("--backend", choices=["torch", "onnxruntime"])
    page = tmp_path / "demo.md"
    page.write_text("# colln-demo\n\n`--keep R`, `--backend torch|onnxruntime`\n")
    assert undocumented("colln-demo", parser, [page]) == ["--keep-all"]
    page.write_text("# colln-demo\n\n`--keep-all`, `--backend torch`\n")  # --keep only as a prefix
    assert undocumented("colln-demo", parser, [page]) == ["--keep", "--backend onnxruntime"]
    other = tmp_path / "other.md"
    other.write_text("# Another command\n\n--keep --keep-all --backend torch onnxruntime\n")
    everything = ["--keep", "--keep-all", "--backend", "--backend torch", "--backend onnxruntime"]
    assert undocumented("colln-demo", parser, [other]) == everything  # that page is not about colln-demo


@pytest.mark.parametrize("name", ["colln-bench", "colln-validate"])
def test_reference_pages_name_every_option_and_backend(name: str) -> None:
    """The command's own reference page, not just some page naming the command, lists each of its
    options and every --backend choice (OpenVINO's was missing)."""
    parser = commands()[name]
    page = (DOCS / "reference" / f"{name}.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `([^`]*)`", page, re.M))
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS and "-h" not in action.option_strings:
            assert any(action.option_strings[0] in cell for cell in table), (name, action.option_strings[0])
        if "--backend" in action.option_strings:
            (cell,) = (c for c in table if "--backend" in c)
            assert sorted(cell.split(" ", 1)[1].split("|")) == sorted(action.choices), cell
