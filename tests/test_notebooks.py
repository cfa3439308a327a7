"""The notebooks run top to bottom on a finished tiny sweep and draw their figures."""
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = {  # name -> (figures it must draw, seconds it may take)
    "spectral_dynamics": (5, 300),
    "rank_collapse": (3, 60),
}


def read(name):
    return nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_on_the_tiny_sweep(name, tiny_sweep_workdir):
    figures, seconds = NOTEBOOKS[name]
    nb = read(name)
    client = NotebookClient(nb, timeout=seconds, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}})
    start = time.perf_counter()
    client.execute(env={**os.environ, "MLA_RMT_WORKDIR": str(tiny_sweep_workdir)})  # raises on an error
    elapsed = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == figures
    assert elapsed < seconds, f"{name} took {elapsed:.0f}s"
    text = "\n".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in outputs)
    if name == "spectral_dynamics":       # the table has a row per trial of the sweep
        trials = sorted(p.name for p in tiny_sweep_workdir.iterdir() if (p / "result.json").exists())
        assert len(trials) == 10 and all(t in text for t in trials)
    else:                                  # the width experiment's table and the depth figure
        assert "A-11^T/T" in text and "diag(i/T)(A_c-U)" in text
