"""The docs hold together: README's size, the generated settings page, links, the site's nav and build."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from producer.contract.settings import ENV_PREFIX, Settings
from producer.contract.settings_doc import settings_markdown

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# [text](target): a link's target up to its closing parenthesis, without a title
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_at_most_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to a page under docs/"


def test_the_settings_page_is_generated_from_settings():
    committed = (DOCS / "settings.md").read_text()
    assert committed == settings_markdown(), (
        "docs/settings.md differs from Settings; run "
        "`python -m producer.contract.settings_doc > docs/settings.md`"
    )


def test_the_settings_page_names_every_setting():
    page = (DOCS / "settings.md").read_text()
    names = [ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)]
    missing = [name for name in names if f"`{name}`" not in page]
    assert not missing, f"docs/settings.md lacks {missing}"


@pytest.mark.parametrize("name", ["README.md", "CONTRIBUTING.md"])
def test_every_relative_link_resolves_to_a_file(name):
    text = (ROOT / name).read_text()
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert targets, f"{name} links to no file"
    broken = [t for t in targets if not (ROOT / t.split("#")[0]).is_file()]
    assert not broken, f"{name} links to missing files: {broken}"


def test_the_nav_lists_every_page():
    listed = re.findall(r"([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    nav = set(listed)
    twice = sorted(p for p in nav if listed.count(p) > 1)
    assert not twice, f"mkdocs.yml's nav lists a page twice: {twice}"
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"mkdocs.yml's nav names missing pages: {sorted(nav - pages)}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed (the docs extra)")
def test_the_site_builds_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "index.html").is_file()
    assert (tmp_path / "settings" / "index.html").is_file()


def test_the_cli_page_has_every_command_and_flag():
    import argparse

    from producer.cli import build_parser

    page = (DOCS / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"m3q {name}" for name in sub.choices if f"## m3q {name}" not in page]
    # a command's own flags; the settings flags are on the settings page
    settings_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(Settings)}
    missing += [f"m3q {name} {flag}" for name, parser in sub.choices.items() for action in parser._actions
                for flag in action.option_strings
                if flag.startswith("--") and flag not in settings_flags | {"--help"} and f"`{flag}" not in page]
    assert not missing, f"docs/cli.md lacks {missing}"


def test_the_python_client_page_has_every_public_call():
    import producer
    from producer.client import Client

    page = (DOCS / "python-client.md").read_text()
    names = [n for n in dir(Client) if not n.startswith("_")] + list(producer.__all__)
    missing = [n for n in names if f"`{n}" not in page and f"`async {n}" not in page]
    assert not missing, f"docs/python-client.md lacks {missing}"
