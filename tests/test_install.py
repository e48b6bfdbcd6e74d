"""The light install (issue 14): the bare package, no extras, in a fresh venv (not --system-site-packages,
which would hide a missing dependency), makes a real `m3q encode` call through a real worker; the commands
that need the worker extra say so in one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from producer.client import Client
from tests.conftest import ROOT, make_settings, settings_env

PACKAGE_FILES = ["pyproject.toml", "README.md", "producer", "worker"]


def bare_venv(folder: Path) -> Path:
    """A fresh venv with ``pip install <checkout>``, no extras; returns its bin folder."""
    source = folder / "m3-queue"
    source.mkdir()
    for name in PACKAGE_FILES:  # a copy: an in-tree build would leave build/ and *.egg-info in the checkout
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "venv", str(folder / "venv")], check=True, timeout=120)
    pip = subprocess.run([str(folder / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return folder / "venv" / "bin"


def bare_env(s) -> dict[str, str]:
    env = settings_env(s)
    env.pop("PYTHONPATH", None)  # nothing of the checkout or the main venv may leak in
    env.pop("VIRTUAL_ENV", None)
    main_bin = str(Path(sys.executable).parent)  # the main venv's scripts (milvus-lite, ...) stay out of reach
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != main_bin)
    return env


@pytest.mark.slow
def test_the_bare_package_encodes_through_a_real_worker(tmp_path, spawn_worker):
    s = make_settings()
    worker = spawn_worker(s, wait=False)  # the main venv's worker loads the tiny model while pip installs
    bin_dir = bare_venv(tmp_path)
    probe = subprocess.run([str(bin_dir / "python"), "-c", "import torch"], capture_output=True, cwd=tmp_path)
    assert probe.returncode != 0, "the bare venv must not have torch"
    worker.wait_ready()

    texts = ["the light package", "talks to the workers"]
    stdin = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts))
    out = subprocess.run([str(bin_dir / "m3q"), "encode"], input=stdin, env=bare_env(s), cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    expected = Client(s).encode_documents(texts)
    assert [r["id"] for r in rows] == [0, 1]
    for row, item in zip(rows, expected):
        np.testing.assert_allclose(np.array(row["dense"], dtype=np.float32), item.dense, rtol=1e-5, atol=1e-6)
        assert {int(k): v for k, v in row["sparse"].items()}.keys() == item.sparse_dict().keys()

    for command in (["worker"], ["encode", "--local"], ["demo"], ["replica", str(tmp_path / "replica")]):
        done = subprocess.run([str(bin_dir / "m3q"), *command], input=stdin, env=bare_env(s), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        print(f"\n$ m3q {command[0]}  (bare install)\n{done.stderr.strip()}")
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        # m3-queue is on no package index: the hint names the folder this copy was installed from.
        assert f"install the worker extra: pip install 'm3-queue[worker] @ {(tmp_path / 'm3-queue').as_uri()}'" \
            in lines[0], lines[0]

    # Run from a checkout (the package next to its pyproject.toml), the hint is the checkout's editable install.
    done = subprocess.run([str(bin_dir / "python"), "-m", "producer.cli", "worker"], env=bare_env(s), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    print(f"\n$ python -m producer.cli worker  (bare install, in the checkout)\n{done.stderr.strip()}")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.strip().endswith(f"install the worker extra: cd {ROOT} && pip install -e '.[worker]'")
