"""Every trial of a sweep at once on one GPU, then its scalars as one small file.

A 130M model at batch 32 x 256 leaves most of an H100 idle and a trial's start (compilation,
the first spectra and figures) is host work, so the trials run side by side, each in its own
process with a share of the GPU memory. At `--deadline` seconds the unfinished ones get
SIGTERM (they save and stop); then `export_scalars` writes every trial's scalars.

    python bench/replication.py --workdir=/tmp/rep --out=$OUT     # configs/replication.py
"""
import argparse
import os
import pathlib
import signal
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import export_scalars  # noqa: E402  (bench/export_scalars.py)


def prepare(config_path: str) -> int:
    """Builds the corpus and tokenizer once, before the trials race for them; returns #trials."""
    from mla_rmt import sweep, tokenizer
    config = sweep.load_config(config_path)
    tokenizer.get_tokenizer(config.data, config.model.vocab_size)
    return len(sweep.load(config_path))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/replication.py")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--trials", default="", help="comma-separated trial indices (default all)")
    parser.add_argument("--deadline", type=float, default=520.0, help="seconds until SIGTERM")
    args = parser.parse_args()
    start = time.time()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    count = prepare(args.config)
    indices = [int(i) for i in args.trials.split(",")] if args.trials else list(range(count))
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / len(indices):.3f}")
    procs = {}
    for i in indices:
        log = open(out / f"log_{i}.txt", "w")
        procs[i] = subprocess.Popen(
            [sys.executable, "-m", "mla_rmt.main", f"--config={args.config}",
             f"--workdir={args.workdir}", f"--trial={i}"], stdout=log, stderr=subprocess.STDOUT,
            env=env)
    print(f"{len(procs)} trials started after {time.time() - start:.0f} s", flush=True)

    while any(p.poll() is None for p in procs.values()):
        if time.time() - start > args.deadline:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(timeout=45)
                except subprocess.TimeoutExpired:
                    p.kill()
            break
        time.sleep(2)
    for i, p in procs.items():
        print(f"trial {i}: exit {p.returncode}", flush=True)

    path = out / "rep_scalars.json.gz"
    export_scalars.write(args.workdir, str(path))
    print(f"done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
