"""Benchmarks of the trainer's public pieces (mla_rmt.step's Trainer, mla_rmt.loss,
mla_rmt.optimizer). Run from the repo root as modules, e.g. `python -m bench.throughput --tiny`,
or on the GPU machine through `bash bench/gpu_suite.sh bench/throughput.py ...`."""
