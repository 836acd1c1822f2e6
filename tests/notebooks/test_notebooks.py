"""Every notebook in notebooks/ executes top to bottom without error."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    # the kernel inherits the environment: small models run several times faster on one OpenMP thread on a
    # loaded 2-core machine (barriers between tiny kernels cost more than they save)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert (tmp_path / "quickstart_backends.png").exists() or path.name != "01_quickstart.ipynb"
    assert list(tmp_path.glob("*.png")), f"{path.name} wrote no figure"
