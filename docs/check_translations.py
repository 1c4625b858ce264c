"""Check (or refresh) the Chinese catalogues against the English pages.

``python docs/check_translations.py`` extracts the messages of every page with Sphinx's gettext
builder (into a temporary folder) and fails, listing them, when a message that needs translating
has no entry in ``docs/locale/zh_CN/LC_MESSAGES/<page>.po``, an empty translation, or one marked
fuzzy. A new or changed English paragraph therefore fails the check instead of appearing in
English on the Chinese site. Messages with nothing to translate (only code, numbers, identifiers)
are exempt, and so is the API reference (generated from docstrings).

``python docs/check_translations.py --update`` refreshes the catalogues after an English page
changed (``sphinx-intl update``), then fills in the exempt messages with themselves so that
``msgfmt --statistics`` reports no untranslated entry either. Make targets: ``check-translations``
and ``update-po`` (docs/translating.md).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from babel.messages.pofile import read_po, write_po

DOCS = Path(__file__).resolve().parent
LANGUAGE = "zh_CN"
CATALOGUES = DOCS / "locale" / LANGUAGE / "LC_MESSAGES"
UNTRANSLATED_PAGES = {"api"}  # generated from docstrings; stays English


@dataclass(frozen=True)
class Missing:
    """One message of a page with no usable translation."""

    page: str
    location: str
    reason: str  # "missing", "empty" or "fuzzy"
    text: str

    def __str__(self) -> str:
        snippet = " ".join(self.text.split())
        snippet = snippet if len(snippet) <= 100 else snippet[:97] + "..."
        return f"{self.page}.po: {self.location}: {self.reason}: {snippet}"


_CODE = re.compile(r"``.*?``|`[^`]*`|\{[a-z:]+\}|https?://\S+|<[^>]+>")
_NOT_WORDS = re.compile(r"\S*[_=/\d]\S*")


def needs_translation(text: str) -> bool:
    """False for messages made only of code, identifiers, numbers and punctuation."""
    prose = _NOT_WORDS.sub(" ", _CODE.sub(" ", text))
    return re.search(r"[A-Za-z]{2,}", prose) is not None


def extract(out_dir: Path) -> Path:
    """Run Sphinx's gettext builder on the docs; returns the folder of ``<page>.pot`` files."""
    from sphinx.cmd.build import build_main

    status = build_main(["-b", "gettext", "-q", "-W", "--keep-going", str(DOCS), str(out_dir)])
    if status:
        raise SystemExit(f"sphinx-build -b gettext failed with status {status}")
    return out_dir


def _read(path: Path):
    with path.open("rb") as f:
        return read_po(f, locale=LANGUAGE)


def missing_translations(pot_dir: Path) -> list[Missing]:
    """Every message of the templates in ``pot_dir`` that the catalogues do not translate."""
    found: list[Missing] = []
    for pot_path in sorted(pot_dir.rglob("*.pot")):
        page = pot_path.relative_to(pot_dir).with_suffix("").as_posix()
        if page in UNTRANSLATED_PAGES:
            continue
        po_path = CATALOGUES / f"{page}.po"
        catalogue = _read(po_path) if po_path.exists() else None
        for message in _read(pot_path):
            if not message.id or not needs_translation(message.id):
                continue
            where = ", ".join(f"{Path(f).name}:{n}" for f, n in message.locations[:1]) or "?"
            entry = catalogue.get(message.id) if catalogue is not None else None
            if entry is None:
                found.append(Missing(page, where, "missing", message.id))
            elif not entry.string:
                found.append(Missing(page, where, "empty", message.id))
            elif entry.fuzzy:
                found.append(Missing(page, where, "fuzzy", message.id))
    return found


def update(pot_dir: Path) -> None:
    """Merge the templates into the catalogues; fill the messages that need no translation."""
    from sphinx_intl.basic import update as intl_update

    intl_update(str(DOCS / "locale"), str(pot_dir), (LANGUAGE,), line_width=100)
    for page in UNTRANSLATED_PAGES:  # sphinx-intl creates them; they would stay English anyway
        (CATALOGUES / f"{page}.po").unlink(missing_ok=True)
    for po_path in sorted(CATALOGUES.rglob("*.po")):
        catalogue = _read(po_path)
        changed = False
        for message in catalogue:
            # nothing to translate: the text is its own translation (also replacing a fuzzy
            # guess that sphinx-intl may have copied from a similar entry)
            if (
                message.id
                and not needs_translation(message.id)
                and (message.string != message.id or message.fuzzy)
            ):
                message.string = message.id
                message.flags.discard("fuzzy")
                message.previous_id = []
                changed = True
        if changed:
            with po_path.open("wb") as f:
                write_po(f, catalogue, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="refresh the catalogues first")
    args = parser.parse_args(argv)
    # A fixed folder, so that the source locations written into the catalogues are stable
    pot_dir = extract(DOCS / "_build" / "gettext")
    if args.update:
        update(pot_dir)
    missing = missing_translations(pot_dir)
    for entry in missing:
        print(entry)
    if missing:
        print(f"{len(missing)} message(s) without a {LANGUAGE} translation (docs/translating.md)")
        return 1
    print(f"{LANGUAGE} catalogues complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
