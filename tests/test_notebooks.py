"""The notebooks run top to bottom, on a finished tiny sweep and on the committed replication
export, and draw their figures."""
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO, TINY_SWEEP_TRIALS

EXPORT = REPO / "results" / "replication_prose" / "scalars.json.gz"

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


def execute(name, workdir):
    """Runs the notebook with MLA_RMT_WORKDIR=workdir; returns its outputs and wall seconds."""
    nb = read(name)
    client = NotebookClient(nb, timeout=NOTEBOOKS[name][1], kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}})
    start = time.perf_counter()
    client.execute(env={**os.environ, "MLA_RMT_WORKDIR": str(workdir)})  # raises on an error
    elapsed = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == NOTEBOOKS[name][0]
    assert elapsed < NOTEBOOKS[name][1], f"{name} took {elapsed:.0f}s"
    return "\n".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in outputs)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_on_the_tiny_sweep(name, tiny_sweep_workdir):
    text = execute(name, tiny_sweep_workdir)
    if name == "spectral_dynamics":       # the table has a row per trial of the sweep
        trials = sorted(p.name for p in tiny_sweep_workdir.iterdir() if (p / "result.json").exists())
        assert len(trials) == len(TINY_SWEEP_TRIALS) and all(t in text for t in trials)
    else:                                  # the width experiment's table and the depth figure
        assert "A-11^T/T" in text and "diag(i/T)(A_c-U)" in text


def test_spectral_dynamics_runs_on_the_replication_export():
    """The committed export of the GPU replication, read as REPRODUCTION.md's figures are."""
    from mla_rmt import events  # pylint: disable=import-outside-toplevel
    _, trials = events.load(str(EXPORT))
    text = execute("spectral_dynamics", EXPORT)
    assert len(trials) >= 6 and all(t in text for t in trials["trial"])
