"""The launch recipes' dry runs print the right commands, scripts and manifests; bad arguments fail.

Where it is cheap, what a recipe prints is also executed here with fake `srun`/`python`/`sbatch`/
`kubectl` stand-ins, so the shell quoting is checked end to end (no cluster, no network).
"""
import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from mla_rmt import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
SWEEP = "configs/rope_budget_sweep.py"
NUM_TRIALS = len(sweep.load(str(REPO / SWEEP)))
OVERRIDE = "--config.data.data_dir=gs://b/it's here"     # a space and a quote to survive


def launch(tmp_path, recipe, *args, env=None):
    return subprocess.run([sys.executable, str(REPO / "launch" / f"{recipe}.py"), *map(str, args)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def heredoc(text: str) -> tuple[str, str, str]:
    """(the command line before <<'EOF', the document, what follows EOF) of a printed heredoc."""
    head, rest = text.split(" <<'EOF'\n", 1)
    document, after = rest.split("\nEOF\n", 1)
    return head.splitlines()[-1], document + "\n", after


@pytest.fixture
def fake_bin(tmp_path):
    """A bin/ with a `python` that prints its argv and device variables as JSON."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fakepy"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), "
                    "'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'), "
                    "'ids': os.environ.get('JAX_LOCAL_DEVICE_IDS')}))\n")
    fake.chmod(0o755)
    return bin_dir


def write_tool(bin_dir, name, body):
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


# ---------------------------------------------------------------------------------- TPU VM

def test_tpu_vm_runs_main_on_every_worker(tmp_path, fake_bin):
    out = ok(launch(tmp_path, "tpu_vm", "--tpu", "my-slice", "--zone", "us-east5-a",
                    "--project", "proj", "--config", SWEEP, "--workdir", "gs://b/sweep",
                    "--trial", 3, "--python", fake_bin / "fakepy", "--dry_run", "--", OVERRIDE))
    lines = out.splitlines()
    assert len(lines) == 1                                  # no --setup: just the run
    argv = shlex.split(lines[0])
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-slice"]
    assert {"--worker=all", "--zone=us-east5-a", "--project=proj"} <= set(argv)
    remote = argv[argv.index("--command") + 1]
    expected = [str(fake_bin / "fakepy"), "-m", "mla_rmt.main", f"--config={SWEEP}",
                "--workdir=gs://b/sweep", "--trial=3", OVERRIDE]
    assert shlex.split(remote) == ["cd", "mla_rmt", "&&", *expected]
    # What each worker's shell would do with it.
    (tmp_path / "mla_rmt").mkdir()
    ran = json.loads(subprocess.run(["bash", "-c", remote], cwd=tmp_path, check=True,
                                    capture_output=True, text=True).stdout)
    assert ran["argv"] == expected[1:] and ran["cwd"].endswith("mla_rmt")


def test_tpu_vm_setup_from_url(tmp_path):
    out = ok(launch(tmp_path, "tpu_vm", "--tpu", "t", "--zone", "z", "--config", SWEEP,
                    "--workdir", "gs://b/s", "--setup", "--repo", "https://github.com/o/r.git",
                    "--branch", "dev", "--dry_run"))
    setup, run = (shlex.split(line) for line in out.splitlines())
    assert "--worker=all" in setup and "--worker=all" in run and "--zone=z" in setup
    script = setup[setup.index("--command") + 1]
    assert "git -C mla_rmt fetch -q https://github.com/o/r.git dev" in script
    assert "checkout -q --force -B dev FETCH_HEAD" in script
    assert "python3 -m pip install -U 'jax[tpu]'" in script
    assert script.endswith("python3 -m pip install -e ./mla_rmt")
    assert "--trial" not in run[run.index("--command") + 1]   # no --trial: every trial in turn


@pytest.mark.skipif(not shutil.which("git"), reason="needs git")
def test_tpu_vm_setup_from_local_checkout_clones_then_updates(tmp_path, fake_bin):
    """The printed bundle + setup commands, executed with `gcloud scp` replaced by a copy."""
    src, home = tmp_path / "src", tmp_path / "home"
    home.mkdir()
    git = ["git", "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run(["git", "init", "-q", "-b", "dev", str(src)], check=True)

    def commit(text):
        (src / "f.txt").write_text(text)
        subprocess.run([*git, "-C", str(src), "add", "."], check=True)
        subprocess.run([*git, "-C", str(src), "commit", "-qm", text], check=True)

    write_tool(fake_bin, "python3", 'echo "python3 $*"')
    bundle = tmp_path / "x.bundle"
    for version in ("v1", "v2"):
        commit(version)
        out = ok(launch(tmp_path, "tpu_vm", "--tpu", "t", "--zone", "z", "--config", SWEEP,
                        "--workdir", "gs://b/s", "--setup", "--repo", src, "--branch", "dev",
                        "--remote_dir", "ckpt", "--dry_run"))
        create, scp, setup, _ = (shlex.split(line) for line in out.splitlines())
        assert create[:3] == ["git", "-C", str(src)] and create[-1] == "dev"
        assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
        assert scp[5:7] == [create[-2], "t:ckpt.bundle"]
        create[-2] = str(bundle)                                  # not into the shared /tmp
        subprocess.run(create, check=True, capture_output=True)
        shutil.copy(bundle, home / "ckpt.bundle")                    # what scp would do
        if version == "v2":
            (home / "ckpt" / "f.txt").write_text("local edit")      # discarded by the update
        result = subprocess.run(["bash", "-c", setup[setup.index("--command") + 1]], cwd=home,
                                env={**os.environ, "HOME": str(home),
                                     "PATH": f"{fake_bin}:{os.environ['PATH']}"},
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert (home / "ckpt" / "f.txt").read_text() == version
        assert "python3 -m pip install -e ./ckpt" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--workdir", "/tmp/runs"], "gs://"),
    ([], "--workdir"),
    (["--workdir", "gs://b/s", "--", "oops"], "--config.a.b=value"),
])
def test_tpu_vm_bad_arguments(tmp_path, args, message):
    result = launch(tmp_path, "tpu_vm", "--tpu", "t", "--zone", "z", "--config", SWEEP,
                    *args, "--dry_run")
    assert result.returncode != 0 and message in result.stderr
    assert result.stdout == ""


# ----------------------------------------------------------------------------------- SLURM

def slurm(tmp_path, *args, fake_bin=None):
    python = ["--python", fake_bin / "fakepy"] if fake_bin else []
    out = ok(launch(tmp_path, "slurm", "--partition", "gpu", "--time", "24:00:00",
                    "--workdir", tmp_path / "runs", *python, "--dry_run", *args))
    head, script, after = heredoc(out)
    path = tmp_path / "runs" / pathlib.Path(shlex.split(head)[-1]).name
    assert head == f"cat > {path}"                       # defaults to the (local) workdir
    assert after == f"sbatch {path}\n"
    return script


def run_batch_script(tmp_path, script, fake_bin, local_id, **env):
    """Runs the sbatch script with an `srun` that starts one task with SLURM_LOCALID."""
    write_tool(fake_bin, "srun", f'export SLURM_LOCALID={local_id}; exec "$@"')
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    base = {k: v for k, v in os.environ.items()
            if k not in ("CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS")}
    result = subprocess.run(["bash", str(path)], capture_output=True, text=True, check=True,
                            env={**base, "PATH": f"{fake_bin}:{os.environ['PATH']}", **env})
    return json.loads(result.stdout)


def test_slurm_per_gpu_array_over_the_sweep(tmp_path, fake_bin):
    script = slurm(tmp_path, "--nodes", 2, "--gpus_per_node", 8, "--mode", "gpu",
                   "--account", "acct", "--config", SWEEP, "--", OVERRIDE, fake_bin=fake_bin)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                      "--time=24:00:00", "--account=acct", f"--array=0-{NUM_TRIALS - 1}",
                      f"--chdir={REPO}", f"--output={tmp_path / 'runs'}/%x-%A_%a.out"]:
        assert f"#SBATCH {directive}" in lines
    assert "--trial=$SLURM_ARRAY_TASK_ID" in script
    assert "CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in script
    ran = run_batch_script(tmp_path, script, fake_bin, local_id=3, SLURM_ARRAY_TASK_ID="7")
    assert ran["argv"] == ["-m", "mla_rmt.main", f"--config={SWEEP}",
                           f"--workdir={tmp_path / 'runs'}", "--trial=7", OVERRIDE]
    assert ran["cuda"] == "3" and ran["ids"] == "0"   # one GPU, which JAX calls device 0


def test_slurm_per_node_sees_all_gpus(tmp_path, fake_bin):
    script = slurm(tmp_path, "--nodes", 4, "--gpus_per_node", 4, "--mode", "node",
                   "--config", SWEEP, "--max_parallel", 2, fake_bin=fake_bin)
    lines = script.splitlines()
    assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --nodes=4" in lines
    assert f"#SBATCH --array=0-{NUM_TRIALS - 1}%2" in lines
    assert not any(line.startswith("#SBATCH --account") for line in lines)
    assert "CUDA_VISIBLE_DEVICES" not in script
    ran = run_batch_script(tmp_path, script, fake_bin, local_id=0, SLURM_ARRAY_TASK_ID="2")
    assert ran["argv"][-1] == "--trial=2"
    assert ran["cuda"] is None and ran["ids"] == "0,1,2,3"   # not just GPU $SLURM_LOCALID


def test_slurm_no_sweep_means_no_array(tmp_path):
    script = slurm(tmp_path, "--nodes", 1, "--gpus_per_node", 1, "--mode", "node",
                   "--config", "configs/llama.py:tiny")
    assert "--array" not in script and "--trial" not in script
    assert "--config=configs/llama.py:tiny" in script
    assert "%x-%j.out" in script


def test_slurm_single_trial(tmp_path):
    script = slurm(tmp_path, "--nodes", 1, "--gpus_per_node", 8, "--mode", "gpu",
                   "--config", SWEEP, "--trial", NUM_TRIALS - 1)
    assert "--array" not in script and f"--trial={NUM_TRIALS - 1}" in script


def test_slurm_writes_and_submits(tmp_path, fake_bin):
    args = ["--nodes", 1, "--gpus_per_node", 8, "--mode", "gpu", "--partition", "p",
            "--time", "60", "--config", SWEEP, "--workdir", tmp_path / "runs"]
    printed = heredoc(ok(launch(tmp_path, "slurm", *args, "--dry_run")))[1]
    write_tool(fake_bin, "sbatch", f'echo "$@" > {tmp_path}/sbatch_args')
    ok(launch(tmp_path, "slurm", *args, env={"PATH": f"{fake_bin}:{os.environ['PATH']}"}))
    path = tmp_path / "runs" / "mla_rmt-rope_budget_sweep.sbatch"
    assert (tmp_path / "sbatch_args").read_text().strip() == str(path)
    assert path.read_text() == printed


@pytest.mark.parametrize("args, message", [
    (["--mode", "foo", "--workdir", "runs"], "invalid choice: 'foo'"),
    (["--mode", "gpu"], "the following arguments are required: --workdir"),
    (["--mode", "gpu", "--workdir", "runs", "--trial", 99], "--trial=99"),
    (["--mode", "gpu", "--workdir", "runs", "--time", "1 day"], "--time"),
])
def test_slurm_bad_arguments(tmp_path, args, message):
    result = launch(tmp_path, "slurm", "--nodes", 1, "--gpus_per_node", 8, "--partition", "p",
                    "--time", "60", "--config", SWEEP, *args, "--dry_run")
    assert result.returncode == 2 and message in result.stderr
    assert result.stdout == ""


# ------------------------------------------------------------------------------------- GKE

def gke_manifests(tmp_path, *args):
    yaml = pytest.importorskip("yaml")
    head, manifest, after = heredoc(ok(launch(tmp_path, "gke", "--image", "img:1",
                                              "--workdir", "gs://b/sweep", "--dry_run", *args)))
    assert head == "kubectl apply -f -" and after == ""
    return list(yaml.safe_load_all(manifest))


def pod_of(jobset):
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True}
    [replicated] = jobset["spec"]["replicatedJobs"]
    assert replicated["name"] == "workers" and replicated["replicas"] == 1
    job = replicated["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    return job, job["template"]["spec"]


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_gke_tpu_one_jobset_per_trial(tmp_path):
    docs = gke_manifests(tmp_path, "--accelerator", "tpu", "--tpu_type", "v5p-16",
                         "--tpu_topology", "2x2x2", "--config", SWEEP, "--", OVERRIDE)
    assert len(docs) == NUM_TRIALS
    for trial, jobset in enumerate(docs):
        name = jobset["metadata"]["name"]
        assert name == f"mla-rmt-t{trial}"
        job, pod = pod_of(jobset)
        assert job["parallelism"] == job["completions"] == 2        # 8 chips, 4 per host
        assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                       "cloud.google.com/gke-tpu-topology": "2x2x2"}
        [container] = pod["containers"]
        assert container["image"] == "img:1"
        assert container["resources"]["limits"] == {"google.com/tpu": 4}
        assert container["command"] == ["python", "-m", "mla_rmt.main", f"--config={SWEEP}",
                                        "--workdir=gs://b/sweep", f"--trial={trial}", OVERRIDE]
        assert env_of(container) == {
            "JAX_COORDINATOR_ADDRESS": f"{name}-workers-0-0.{name}:1234",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": {"fieldRef": {"fieldPath":
                "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}


def test_gke_gpu_single_trial(tmp_path):
    [jobset] = gke_manifests(tmp_path, "--accelerator", "gpu", "--gpus_per_host", 8,
                             "--num_hosts", 4, "--config", SWEEP, "--trial", 5, "--name", "abl")
    job, pod = pod_of(jobset)
    assert jobset["metadata"]["name"] == "abl-t5"
    assert job["parallelism"] == job["completions"] == 4
    assert "nodeSelector" not in pod
    [container] = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert container["command"][-1] == "--trial=5"
    assert env_of(container)["JAX_NUM_PROCESSES"] == "4"
    assert env_of(container)["JAX_COORDINATOR_ADDRESS"] == "abl-t5-workers-0-0.abl-t5:1234"


def test_gke_no_sweep_is_one_jobset_without_trial(tmp_path):
    [jobset] = gke_manifests(tmp_path, "--accelerator", "gpu", "--config", "configs/llama.py:tiny")
    assert jobset["metadata"]["name"] == "mla-rmt"
    assert not any(a.startswith("--trial") for a in pod_of(jobset)[1]["containers"][0]["command"])


def test_gke_applies_through_kubectl(tmp_path, fake_bin):
    args = ["--accelerator", "gpu", "--image", "i", "--config", SWEEP, "--workdir", "gs://b/s"]
    printed = heredoc(ok(launch(tmp_path, "gke", *args, "--dry_run")))[1]
    write_tool(fake_bin, "kubectl", f'echo "$@" > {tmp_path}/args; cat > {tmp_path}/stdin')
    ok(launch(tmp_path, "gke", *args, env={"PATH": f"{fake_bin}:{os.environ['PATH']}"}))
    assert (tmp_path / "args").read_text() == "apply -f -\n"
    assert (tmp_path / "stdin").read_text() == printed


@pytest.mark.parametrize("args, message", [
    (["--accelerator", "tpu", "--tpu_type", "v5p-16", "--tpu_topology", "2x2x4"], "does not match"),
    (["--accelerator", "tpu", "--tpu_type", "v5p-16"], "--tpu_topology"),
    (["--accelerator", "tpu", "--tpu_type", "v9-8", "--tpu_topology", "2x2"], "--tpu_type=v9-8"),
    (["--accelerator", "fpga"], "invalid choice: 'fpga'"),
    (["--accelerator", "gpu", "--name", "Bad_Name"], "--name"),
])
def test_gke_bad_arguments(tmp_path, args, message):
    result = launch(tmp_path, "gke", "--image", "i", "--config", SWEEP, "--workdir", "gs://b/s",
                    *args, "--dry_run")
    assert result.returncode == 2 and message in result.stderr
    assert result.stdout == ""


def test_gke_yaml_emitter_round_trips_awkward_strings():
    yaml = pytest.importorskip("yaml")
    sys.path.insert(0, str(REPO / "launch"))
    try:
        spec = importlib.util.spec_from_file_location("gke_recipe", REPO / "launch" / "gke.py")
        gke = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gke)
    finally:
        sys.path.remove(str(REPO / "launch"))
    value = {"strings": ["on", "No", "null", "~", "", "2x2x2", "1234", "1e3", "a: b", "#x", "-m",
                         "it's \"q\"", "ü", "x\ny", "[0]", "*a", "&b", "!c", "%d", "@e", "`f"],
             "numbers": [0, -1, 2.5, True, False], "empty": {}, "none": [],
             "nested": [{"a": [1, {"b": "c"}], "d": {}}, [1, 2]], "google.com/tpu": 4}
    assert yaml.safe_load(gke.to_yaml(value)) == value
