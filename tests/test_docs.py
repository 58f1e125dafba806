"""The documentation stays true to the repository.

Links in the README and the docs resolve to files inside the repository; no tracked file
points outside it; the README stays a front page with its quick start; and
docs/configuration.md documents exactly the settings that ``conf/`` composes to.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from omegaconf import OmegaConf

from fedcil.config import compose_config, config_groups, group_options

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = ROOT / "docs" / "configuration.md"
README_MAX_LINES = 250
# Written in two parts so that this file does not match itself.
OUTSIDE_REFERENCES = ("../" + "shared", "DESIGN" + ".md")

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
KEY_CELL = re.compile(r"^`([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)`$")


def doc_pages() -> list[Path]:
    """README.md, every page of docs/ and bench/README.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def link_targets(markdown: str) -> list[str]:
    """Targets of ``[text](target)`` links outside code blocks and code spans."""
    prose = INLINE_CODE.sub("", FENCE.sub("", markdown))
    return LINK.findall(prose)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Relative links of ``page`` that leave ``root`` or name nothing there."""
    broken = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = unquote(target.split("#", 1)[0])
        resolved = (page.parent / path).resolve()
        if not resolved.is_relative_to(root.resolve()):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file or folder)")
    return broken


def test_every_page_to_check_exists():
    missing = [str(p.relative_to(ROOT)) for p in doc_pages() if not p.is_file()]
    assert not missing, f"documentation pages missing: {missing}"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_the_link_check_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("x")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[ok](there.md#part) [anchor](#top) [web](https://example.org) [up](../docs/)\n"
        "[gone](missing.md) [out](../../elsewhere.md)\n"
        "`[code](not-a-link.md)`\n```\n[fenced](not-a-link-either.md)\n```\n"
    )
    assert broken_links(page, tmp_path) == ["missing.md (no such file or folder)", "../../elsewhere.md (outside the repository)"]


def repository_text_files() -> Iterator[tuple[str, str]]:
    """(path, text) of every tracked or new, not ignored, text file."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in sorted(filter(None, listed)):
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the working tree
        raw = path.read_bytes()
        if b"\0" in raw:
            continue  # binary
        try:
            yield name, raw.decode("utf-8")
        except UnicodeDecodeError:
            continue


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_no_file_refers_to_files_outside_the_repository():
    found = [
        f"{name}:{number}: {reference}"
        for name, text in repository_text_files()
        for number, line in enumerate(text.splitlines(), 1)
        for reference in OUTSIDE_REFERENCES
        if reference in line
    ]
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


def test_readme_is_a_front_page_with_the_quick_start():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"
    starts = [i for i, line in enumerate(lines) if line.strip() == "## Quick start"]
    assert starts, "README.md has no '## Quick start' section"
    end = next((i for i in range(starts[0] + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = "\n".join(lines[starts[0] : end])
    for command in ("scripts/quickstart.sh", "scripts/test.sh"):
        assert command in section, f"README.md's Quick start does not mention {command}"


def leaf_keys(tree: dict, prefix: str = "") -> Iterator[str]:
    """Dotted keys of a config's leaves (lists and empty mappings are leaves)."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaf_keys(value, f"{name}.")
        else:
            yield name


def composed_keys(overrides: tuple[str, ...] = ()) -> set[str]:
    """Every leaf key of ``conf/config.yaml`` composed with ``overrides`` (Hydra's own keys aside)."""
    tree = OmegaConf.to_container(compose_config("config", list(overrides)), resolve=False)
    tree.pop("hydra", None)
    return set(leaf_keys(tree))


def settings_of_conf() -> set[str]:
    """The keys of the default config and of every option of every config group."""
    keys = composed_keys()
    for group in config_groups():
        for option in group_options(group):
            keys |= composed_keys((f"{group}={option}",))
    return keys


def documented_keys(markdown: str) -> tuple[set[str], list[str]]:
    """Keys in the first column of every table whose header's first cell is ``key``, and malformed rows."""
    keys: set[str] = set()
    malformed: list[str] = []
    in_key_table, previous_was_row = False, False
    for line in markdown.splitlines():
        is_row = line.lstrip().startswith("|")
        if not is_row:
            in_key_table, previous_was_row = False, False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not previous_was_row:  # a header row
            in_key_table = cells[0].lower() == "key"
        elif in_key_table and not set(cells[0]) <= set("-: "):
            match = KEY_CELL.match(cells[0])
            if match:
                keys.add(match.group(1))
            else:
                malformed.append(line.strip())
        previous_was_row = True
    return keys, malformed


def test_configuration_page_documents_exactly_the_settings_of_conf():
    documented, malformed = documented_keys(CONFIGURATION.read_text(encoding="utf-8"))
    assert not malformed, f"docs/configuration.md: key rows whose first cell is not one `dotted.key`: {malformed}"
    settings = settings_of_conf()
    missing, unknown = sorted(settings - documented), sorted(documented - settings)
    assert not missing, f"docs/configuration.md does not document these settings of conf/: {missing}"
    assert not unknown, f"docs/configuration.md documents keys that no config in conf/ has: {unknown}"


def test_configuration_page_names_every_group_and_option():
    text = CONFIGURATION.read_text(encoding="utf-8")
    absent = [
        f"{group}={option}"
        for group in config_groups()
        for option in group_options(group)
        if f"`{option}`" not in text and f"`{group}={option}`" not in text
    ]
    assert not absent, f"docs/configuration.md does not name these group options: {absent}"


def test_the_key_table_parser_reads_only_key_tables():
    markdown = (
        "| key | default |\n|---|---|\n| `lora.rank` | 4 |\n| `seed` | 0 |\n\n"
        "| option | meaning |\n|---|---|\n| `lorm` | a method |\n\n"
        "| key | default |\n|---|---|\n| lora.alpha | 8 |\n"
    )
    assert documented_keys(markdown) == ({"lora.rank", "seed"}, ["| lora.alpha | 8 |"])
