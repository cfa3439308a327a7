"""Several trials of a sweep at once on one GPU, then their scalars as one small file.

A 130M model at batch 16 x 256 leaves most of an H200 idle and a trial's start (compilation,
the first spectra and figures) is host work, so the trials run side by side, each in its own
process with a share of the GPU memory. They share one XLA compilation cache (--compile_cache):
the seeds of a variant run the same programs, so a later call on the same machine skips their
compilation. Before they start, the corpus, its tokenizer and its
token counts are built once (the trials would race for them) and the step count is checked
against one pass of the train split. At `--deadline` seconds the unfinished trials get
SIGTERM (they save and stop); then every finished or stopped trial's scalars are exported.

Everything lands in OUT/results/RUN/: log_<trial>.txt, corpus.<trials>.json (documents,
words and tokens per corpus and split, the tokenizer's hash: the same in every call) and
scalars.<trials>.json.gz, which `python -m bench.export_scalars --merge` joins into
scalars.json.gz.

    python -m bench.replication --workdir=/tmp/rep --out=$OUT --trials=0-5   # configs/replication.py
"""
import argparse
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from bench import export_scalars


def corpus_report(config) -> dict:
    """Documents, records, words, characters and tokens of each corpus and split."""
    from mla_rmt import data, tokenizer   # pylint: disable=import-outside-toplevel
    tok = tokenizer.get_tokenizer(config.data, config.model.vocab_size)
    report = {"corpora": config.data.corpora, "vocab_size": tok.get_piece_size(),
              "tokenizer_sha256": hashlib.sha256(tok.serialized_model_proto()).hexdigest(),
              "epoch_steps": data.epoch_steps(config, tok), "splits": {}}
    for split in (config.data.train_split, config.data.eval_split):
        source = data.data_source(config.data, split)
        counts = data.document_token_counts(config.data, tok, split)
        rows: dict[str, dict] = {}
        for i in range(len(source)):
            record = source[i]
            name = record.get("corpus", b"kjv")
            name = name.decode() if isinstance(name, bytes) else str(name)
            text = record["text"].decode("utf-8")
            row = rows.setdefault(name, {"documents": set(), "records": 0, "words": 0,
                                         "chars": 0, "tokens": 0})
            row["documents"].add(record.get("doc_id", str(i).encode()))
            row["records"] += 1
            row["words"] += len(text.split())
            row["chars"] += len(text)
            row["tokens"] += int(counts[i])        # with each record's EOS
        for row in rows.values():
            row["documents"] = len(row["documents"])
        report["splits"][split] = rows
    return report


def prepare(config_path: str) -> tuple[int, dict]:
    """Builds the corpus, tokenizer and token counts once and checks every trial's step count
    against one pass of the train split; returns (#trials, corpus report)."""
    from mla_rmt import data, sweep, tokenizer   # pylint: disable=import-outside-toplevel
    config = sweep.load_config(config_path)
    tok = tokenizer.get_tokenizer(config.data, config.model.vocab_size)
    trials = sweep.load(config_path) or [{}]
    for overrides in trials:
        data.check_epochs(sweep.apply(config, overrides), tok)
    return len(trials), corpus_report(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/replication.py")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--run", default="replication_prose", help="results/<run>/ under --out")
    parser.add_argument("--trials", default="", help="indices: '0-8', '0,3,5' (default all)")
    parser.add_argument("--deadline", type=float, default=450.0,
                        help="seconds until SIGTERM (the device's 600 s per call, less setup and export)")
    parser.add_argument("--compile_cache", default=os.path.join(tempfile.gettempdir(),
                                                                "mla_rmt_jax_cache"),
                        help="XLA compilation cache the trials share ('' for none)")
    args = parser.parse_args()
    start = time.time()
    trial_env = dict(os.environ)
    os.environ["JAX_PLATFORMS"] = "cpu"     # this process never takes GPU memory from the trials
    out = pathlib.Path(args.out) / "results" / args.run
    out.mkdir(parents=True, exist_ok=True)

    count, report = prepare(args.config)
    (out / f"corpus.{args.trials or 'all'}.json").write_text(json.dumps(report, indent=1))
    print(f"corpus and tokenizer ready after {time.time() - start:.0f} s: "
          f"{json.dumps(report['splits'])}", flush=True)
    from mla_rmt import sweep   # pylint: disable=import-outside-toplevel  (after JAX_PLATFORMS)
    try:
        indices = sweep.select(args.trials, count)
    except ValueError as e:
        raise SystemExit(f"--trials: {e}") from None
    env = dict(trial_env, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / len(indices):.3f}")
    if args.compile_cache:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", args.compile_cache)
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

    export_scalars.write(args.workdir, str(out / f"scalars.{args.trials or 'all'}.json.gz"))
    print(f"done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
