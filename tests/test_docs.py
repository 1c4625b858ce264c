"""The documentation builds in both languages, its code runs, and it cannot drift from the code.

Needs the docs requirements (docs/requirements.txt: sphinx, myst-parser, furo, sphinx-intl).
The Sphinx builds run in subprocesses, once per module, into a temporary folder.
"""

from __future__ import annotations

import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sphinx(builder: str, out: Path, *options: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder, *options]
    return subprocess.run([*cmd, str(DOCS), str(out)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    """Both languages built as CI builds them (warnings are errors)."""
    root = tmp_path_factory.mktemp("site")
    for lang in ("en", "zh_CN"):
        done = _sphinx("html", root / lang, "-D", f"language={lang}")
        assert done.returncode == 0, f"{lang} build failed:\n{done.stdout}\n{done.stderr}"
    return {lang: root / lang for lang in ("en", "zh_CN")}


def _text(page: Path) -> str:
    """The visible text of a built page (tags dropped, entities decoded, spaces collapsed)."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", page.read_text(encoding="utf-8"), flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def _flag_rows():
    flags_reference = _load("examples/flags_reference")
    return [
        (a.option_strings, flags_reference.DETAILS.get(a.option_strings[0], a.help))
        for a in flags_reference.context_parallel_actions()
    ]


def test_flags_page_lists_every_parser_flag_in_both_languages(site):
    rows = _flag_rows()
    assert len(rows) >= 8
    pages = {lang: _text(path / "flags.html") for lang, path in site.items()}
    squeezed = {lang: re.sub(r"\s", "", text) for lang, text in pages.items()}
    for option_strings, meaning in rows:
        for lang, text in pages.items():
            for flag in option_strings:
                assert flag in text, f"{flag} missing from the {lang} flags page"
        # compared without spaces (inline code adds spaces around its tags), piece by piece
        # around cross-references (a {doc} role renders as the page's title)
        pieces = [re.sub(r"[`\s]", "", p) for p in re.split(r"\{[a-z:]+\}`[^`]*`", meaning)]
        pieces = [p for p in pieces if len(p) > 3]
        assert pieces and all(p in squeezed["en"] for p in pieces), option_strings[0]
        # the Chinese page carries the translation, not the English description
        assert not any(p in squeezed["zh_CN"] for p in pieces if re.search("[a-z]{4}", p)), (
            f"{option_strings[0]}: untranslated on zh_CN"
        )
    assert "参数与校验规则" in pages["zh_CN"]


def test_every_page_links_to_the_same_page_in_the_other_language(site):
    sources = sorted(p.stem for p in DOCS.glob("*.md"))
    assert {"index", "usage", "flags", "architecture", "npu", "testing"} <= set(sources)
    for name in sources:
        for lang, other in (("en", "zh_CN"), ("zh_CN", "en")):
            page = (site[lang] / f"{name}.html").read_text(encoding="utf-8")
            assert f'href="../{other}/{name}.html"' in page, f"{lang}/{name}.html: no switch"
            # the target exists where `make html-all` puts the two builds side by side
            assert (site[other] / f"{name}.html").exists()


def test_chinese_pages_are_translated_and_use_chinese_diagrams(site):
    usage = _text(site["zh_CN"] / "usage.html")
    assert "如何选择组合" in usage and "Choosing the combination" not in usage
    images = {p.name for p in (site["zh_CN"] / "_images").iterdir()}
    assert {"mesh_2x8.zh_CN.svg", "ring_steps.zh_CN.svg", "ulysses_all_to_all.zh_CN.svg"} <= images
    assert "简体中文" in (site["en"] / "index.html").read_text(encoding="utf-8")


def test_catalogues_translate_every_message(tmp_path):
    check = _load("check_translations")
    done = _sphinx("gettext", tmp_path)
    assert done.returncode == 0, done.stderr
    missing = check.missing_translations(tmp_path)
    assert not missing, "untranslated:\n" + "\n".join(map(str, missing))


def test_catalogue_check_catches_a_new_paragraph(tmp_path):
    check = _load("check_translations")
    assert check.needs_translation("A new paragraph about `--context-parallel-size`.")
    assert not check.needs_translation("`--context-parallel-size` / `ulysses_cp_algo`")
    assert not check.needs_translation("megatron_cp_algo u=1 r=4")
    pot = tmp_path / "usage.pot"
    pot.write_text(
        'msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=UTF-8\\n"\n\n'
        '#: ../../usage.md:1\nmsgid "A paragraph nobody translated yet."\nmsgstr ""\n',
        encoding="utf-8",
    )
    (missing,) = check.missing_translations(tmp_path)
    assert missing.reason == "missing" and missing.page == "usage"


def test_code_on_the_pages_runs(tmp_path):
    done = _sphinx("doctest", tmp_path)
    report = (tmp_path / "output.txt").read_text(encoding="utf-8")
    assert done.returncode == 0, report + done.stderr
    match = re.search(r"(\d+) tests\n\s+0 failures in tests", report)
    assert match and int(match.group(1)) >= 10, report
