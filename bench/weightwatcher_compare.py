"""Side by side with WeightWatcher 0.7.7 on one LLaMA-130M-shaped checkpoint.

    pip install -e ".[weightwatcher]"        # weightwatcher, and torch for its safetensors reader
    python bench/weightwatcher_compare.py --out=/tmp/ww_compare [--layers=12]

Writes a Hugging Face-layout checkpoint (config.json + model.safetensors) holding the attention
projections q/k/v/o of a LLaMA-130M-shaped model (d_model 768, 12 heads of 64), drawn from this
project's init (iid Gaussian, variance 1/fan_in) plus, with --spikes (default), a few rank-one
directions of growing strength so that the tails differ from layer to layer. Then times
  * weightwatcher: `WeightWatcher(model=DIR).analyze()` (every matrix of the checkpoint: the
    4 x L attention projections), its default settings (no plots);
  * mla_rmt, the same single-matrix quantities: each projection read from the file, its ESD
    (`spectral.esd`, eigvalsh of the Gram, jitted, on the default device), lambda_max, stable
    rank and the tail fit (`tail_fit.fit`);
  * mla_rmt's own analysis of the checkpoint (`analyze.analyze_hf`: the QK circuits, MP metrics
    against the product null, tail fits), for scale.
and prints the agreement of lambda_max, stable rank and alpha per matrix (max relative
difference, and how many alphas agree within their standard error), each tool's error in
lambda_max and stable rank against float64 eigenvalues of the same float32 matrices (numpy),
and the wall times. Each timing is the second of two runs (the first compiles); the JSON goes
to OUT/compare.json. `--check=compare.json` recomputes the float64 errors of a saved run (the
checkpoint is drawn again from its seed), for runs made on another machine.
"""
import argparse
import json
import logging
import pathlib
import time

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mla_rmt import analyze, spectral, tail_fit

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_checkpoint(directory: pathlib.Path, layers: int, spikes: bool, seed: int = 0):
    d, h, k = 768, 12, 64
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for name in PROJECTIONS:
            w = rng.standard_normal((d, h * k)) / np.sqrt(d)
            if spikes:   # 1 + layer % 4 spikes of strength growing with depth
                for j in range(1 + layer % 4):
                    u, v = rng.standard_normal(d), rng.standard_normal(h * k)
                    w += (0.5 + 0.25 * layer) * (j + 1) * np.outer(u, v) / d
            tensors[f"model.layers.{layer}.self_attn.{name}.weight"] = w.astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
              "num_attention_heads": h, "num_key_value_heads": h, "head_dim": k,
              "num_hidden_layers": layers, "intermediate_size": 2048, "vocab_size": 32000,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return sorted(tensors)


def run_weightwatcher(directory: pathlib.Path) -> tuple[dict, float]:
    import weightwatcher as ww  # pylint: disable=import-outside-toplevel
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    start = time.perf_counter()
    details = ww.WeightWatcher(model=str(directory)).analyze(plot=False)
    seconds = time.perf_counter() - start
    rows = {}
    for _, row in details.iterrows():
        rows[str(row["longname"]) if "longname" in row else str(row["name"])] = {
            "lambda_max": float(row["spectral_norm"]), "stable_rank": float(row["stable_rank"]),
            "alpha": float(row["alpha"]), "alpha_sigma": float(row["sigma"])}
    return rows, seconds


def run_ours(directory: pathlib.Path, names: list[str]) -> tuple[dict, dict]:
    esd = jax.jit(spectral.esd)
    times = {"read": 0.0, "esd": 0.0, "fit": 0.0}
    rows = {}
    for name in names:
        t0 = time.perf_counter()
        with safe_open(str(directory / "model.safetensors"), framework="numpy") as f:
            w = f.get_tensor(name)
        t1 = time.perf_counter()
        eigs = np.asarray(jax.block_until_ready(esd(w)), np.float64)
        t2 = time.perf_counter()
        fit = tail_fit.fit(eigs)
        t3 = time.perf_counter()
        times["read"] += t1 - t0
        times["esd"] += t2 - t1
        times["fit"] += t3 - t2
        rows[name] = {"lambda_max": float(eigs[0]), "stable_rank": float(eigs.sum() / eigs[0]),
                      "alpha": fit["alpha"], "alpha_sigma": fit["alpha_sigma"], "status": fit["status"]}
    times["total"] = sum(times.values())
    return rows, times


def float64_errors(directory: pathlib.Path, names: list[str], tools: dict) -> dict:
    """tool -> metric -> max / median relative error against float64 eigenvalues of W^T W."""
    exact = {}
    with safe_open(str(directory / "model.safetensors"), framework="numpy") as f:
        for name in names:
            w = f.get_tensor(name).astype(np.float64)
            eigs = np.linalg.eigvalsh(w.T @ w)
            exact[name] = {"lambda_max": eigs[-1], "stable_rank": eigs.sum() / eigs[-1]}
    out = {}
    for tool, rows in tools.items():
        errors = {key: [abs(_match(rows, n)[key] / exact[n][key] - 1) for n in names]
                  for key in ("lambda_max", "stable_rank")}
        out[tool] = {key: {"max_rel_err": float(np.max(v)), "median_rel_err": float(np.median(v))}
                     for key, v in errors.items()}
    return out


def _match(ww_rows: dict, name: str):
    """WeightWatcher's row for a tensor (its names drop the '.weight' suffix, or keep it)."""
    for key in (name, name.removesuffix(".weight")):
        if key in ww_rows:
            return ww_rows[key]
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/ww_compare")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--no-spikes", dest="spikes", action="store_false")
    parser.add_argument("--skip-weightwatcher", action="store_true")
    parser.add_argument("--check", default="", help="a saved compare.json: only its float64 errors")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    directory = out / "checkpoint"
    names = write_checkpoint(directory, args.layers, args.spikes)
    if args.check:
        saved = json.loads(pathlib.Path(args.check).read_text())
        tools = {t: saved[t] for t in ("mla_rmt", "weightwatcher") if t in saved}
        for tool, errors in float64_errors(directory, names, tools).items():
            print(f"float64 error of {tool} on {saved['device']}: {errors}")
        return
    print(f"{len(names)} attention projections of 768 x 768 in {directory}; device {jax.devices()[0]}")

    run_ours(directory, names[:2])                      # compile
    ours, our_times = run_ours(directory, names)
    analyze.analyze_hf(str(directory))                  # compile, null laws
    start = time.perf_counter()
    analyze.analyze_hf(str(directory))
    circuits_seconds = time.perf_counter() - start
    result = {"device": str(jax.devices()[0]), "matrices": len(names),
              "mla_rmt_single_matrix_seconds": our_times,
              "mla_rmt_analyze_hf_seconds": circuits_seconds, "mla_rmt": ours}
    print(f"mla_rmt single matrices: {our_times['total']:.2f} s (read {our_times['read']:.2f}, "
          f"ESD {our_times['esd']:.2f}, tail fit {our_times['fit']:.2f})")
    print(f"mla_rmt analyze --hf (QK circuits, MP metrics, tail fits): {circuits_seconds:.2f} s")

    if not args.skip_weightwatcher:
        run_weightwatcher(directory)                    # warm (imports, first SVD)
        ww_rows, ww_seconds = run_weightwatcher(directory)
        result.update(weightwatcher_seconds=ww_seconds, weightwatcher=ww_rows)
        print(f"weightwatcher 0.7.7: {ww_seconds:.2f} s for {len(ww_rows)} matrices")
        diffs = {"lambda_max": [], "stable_rank": [], "alpha": []}
        within_sigma = 0
        for name in names:
            theirs = _match(ww_rows, name)
            if theirs is None:
                raise SystemExit(f"weightwatcher has no row for {name}; its rows: {sorted(ww_rows)[:5]}...")
            for key in diffs:
                diffs[key].append(abs(ours[name][key] - theirs[key]) / abs(theirs[key]))
            within_sigma += abs(ours[name]["alpha"] - theirs["alpha"]) <= max(theirs["alpha_sigma"], 1e-12)
        agreement = {key: {"max_rel_diff": float(np.max(v)), "median_rel_diff": float(np.median(v))}
                     for key, v in diffs.items()}
        agreement["alpha_within_sigma"] = f"{within_sigma}/{len(names)}"
        result["agreement"] = agreement
        for key, value in agreement.items():
            print(f"agreement {key}: {value}")
    tools = {"mla_rmt": ours, **({"weightwatcher": result["weightwatcher"]}
                                 if "weightwatcher" in result else {})}
    result["float64_error"] = float64_errors(directory, names, tools)
    for tool, errors in result["float64_error"].items():
        print(f"float64 error of {tool}: {errors}")
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    print(f"written to {out / 'compare.json'}")


if __name__ == "__main__":
    main()
