"""A single LLaMA trial. `:tiny` (default) trains on the embedded corpus in minutes on a CPU;
`:llama_130m` is the paper-scale model on C4 through TFDS.

    python -m mla_rmt.main --config=configs/llama.py:tiny --workdir=/tmp/tiny
    python -m mla_rmt.main --config=configs/llama.py:llama_130m --workdir=DIR \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""
from mla_rmt import presets


def get_config(arg: str = "tiny"):
    config = presets.base_config()
    presets.apply_model_preset(config, arg)
    if arg == "llama_130m":
        config.data.source = "tfds"
        config.data.tfds_name = "c4/en:3.1.0"
        config.data.tokenizer_path = ""   # set to a SentencePiece model for C4 (32000 pieces)
        config.data.seq_len = 256
        config.data.global_batch_size = 512
        config.data.worker_count = 8         # grain workers: BENCHMARKS.md, "Input pipeline"
        config.train.microbatch_size = 256      # 2 microbatches per step (bench/throughput.py)
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 1000
        config.train.num_steps = 20000
        config.train.log_every = 50
        config.train.eval_every = 1000
        config.train.eval_batches = 20
        config.train.checkpoint_every = 1000
        config.diagnostics.every = 500
    return config
