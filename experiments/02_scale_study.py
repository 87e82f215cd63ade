"""Scale study: plain vs interleaved vs balanced schedules at P = 4..32, profiled costs.

Two model shapes, built at their true widths and vocabularies:

* GPT-2-medium: token + position embedding, 24 pre-norm blocks (d = 1024,
  16 heads, MLP 4096, GELU, biases), LayerNorm + 50257-way output head
  (``jaxpipe.models``).
* Llama-3-8B: token embedding, 32 blocks (d = 4096, 32 query heads, 8
  key/value heads, RoPE, RMSNorm, SwiGLU MLP 14336, no biases), RMSNorm +
  128256-way output head (local Flax nnx layers below).

Per-layer forward and backward times are measured on this machine with
``jaxpipe.profile`` (float32, one row of ``seq`` tokens: 1024 for GPT-2, its
own context; 128 for Llama, to keep profiling short; each time the median of
REPEATS calls, and the least of PROFILE_RUNS profiles, since the machine is
shared), cached as JSON under ``experiments/results/``. Each distinct layer
(embedding, one block, head) is profiled and the block's cost is repeated for
every block: ``profile`` measures identical layers once anyway, and the 32
full-width Llama blocks alone would hold 28 GB of parameters. Costs of a
micro-batch of ROWS rows are the profiled one-row costs times ROWS (cost
linear in rows, the same assumption ``fractional_partition`` makes when it
splits layers by rows). As a check independent of timing noise, every
prediction is repeated with XLA's flop estimate as the cost.

For each model, P in {4, 8, 16, 32} and M in {P, 4P}, the library's own cost
model predicts one training step of

* ``gpipe``: integer min-max cuts, GPipe order;
* ``1f1b``: integer cuts, 1F1B order (the "plain" baseline);
* ``interleaved V=v``: integer cuts into v * P stages, interleaved 1F1B, with
  the largest v in {2, 4} such that v * P <= L (absent when none fits);
* ``balanced``: fractional cuts (layers split by rows), 1F1B order;
* the planner's pick among all its candidates (``make_plan``).

Candidates come from ``jaxpipe.planner.make_plan``: their cuts, memory,
per-stage costs as the table executor pays them (``Candidate.costs``) and
lock-step step time (``Candidate.step_time``: the schedule packed into executor
ticks, ``jaxpipe.ticks``, each tick as long as its slowest device). The
event-driven time (an asynchronous executor running the same per-device
order) is ``jaxpipe.simulate`` of the same table (``make_schedule(...,
fused=True)``, as ``jaxpipe simulate`` draws it) under ``Candidate.costs``.
Nothing of the cost model is re-implemented here, so the study follows
planner.py when it changes; a check warns if re-timing ``Candidate.costs``
on the packed ticks no longer reproduces ``Candidate.step_time``. Where P > L no
integer cut exists; the fractional candidates are then built with
``fractional_partition`` + ``predict``.

Definitions (per candidate, for each of the two timing models):

* ``bubble``: ``1 - busy / (P * T)``, busy = summed compute of all actions.
* ``equal_T``: the step time of the same schedule table when every (device,
  chunk) has the mean forward and the mean backward cost of the candidate's
  stages (perfectly equal stages, same total cost).
* ``imbalance_idle = T - equal_T``: time lost because stages are unequal;
  ``imbalance_frac = imbalance_idle / T``. The rest of the bubble,
  ``bubble - imbalance_frac``, is pipeline fill/drain.
* ``memory``: the planner's estimate, max over devices (4 x parameter bytes
  for parameters, gradients and two Adam moments, stash slots x one message,
  saved vjp residuals), with the inputs ``Pipeline`` gives it: message = the
  largest activation of a micro-batch (``largest_activation_bytes``: with an
  LM, the logits) and ``residual_bytes`` traced from the layers. Beside it,
  the same estimate with message = one hidden state (what integer cuts send).

Writes ``experiments/results/scale_study.json`` (all numbers, profiled
costs), ``scale_study.csv`` (one row per model, P, M, candidate) and
``scale_study.png``; prints a summary table.

Run: python experiments/02_scale_study.py   (about 4-8 min uncached on 2 shared cores, 2 min cached)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jaxpipe  # noqa: E402
from jaxpipe import models  # noqa: E402
from jaxpipe.partition import fractional_partition  # noqa: E402
from jaxpipe.planner import make_plan, predict  # noqa: E402
from jaxpipe.schedule import make_schedule  # noqa: E402
from jaxpipe.simulate import Costs, simulate  # noqa: E402
from jaxpipe.layers import split_layers  # noqa: E402
from jaxpipe.tracing import residual_bytes, trace_boundaries  # noqa: E402
from jaxpipe.ticks import pack, tick_time  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PROFILED_ROWS = 1           # rows per profiled micro-batch
ROWS = 8                    # rows per planned micro-batch (split granularity of fractional cuts)
GRANULARITY_ROWS = (8, 16, 32)  # side study: balanced at the largest P with finer row splits
REPEATS, WARMUP = 5, 1      # jaxpipe.profile timing
PROFILE_RUNS = 3            # uncached: profile this often, keep each layer's least time
PIPES = (4, 8, 16, 32)
MICROBATCHES = (1, 4)       # M = factor * P
VIRTUAL = (4, 2)            # interleaved: largest that fits first
COST_SOURCES = ("profiled", "xla_flops")

# seq: tokens per row, profiled and planned (GPT-2's own context; Llama shortened to keep profiling short).
MODELS = {
    "gpt2-medium": dict(vocab=50257, dim=1024, heads=16, mlp=4096, blocks=24, seq=1024),
    "llama3-8b": dict(vocab=128256, dim=4096, heads=32, kv_heads=8, mlp=14336, blocks=32, seq=128),
}


class LlamaEmbed(nnx.Module):
    """Token embedding, no positions (RoPE is applied in attention): ``[B, T] -> [B, T, d]``."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
        self.tokens = nnx.Embed(vocab, dim, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.tokens(ids)


def _rope(x: jax.Array, theta: float = 500000.0) -> jax.Array:
    """Rotary position embedding of ``[B, T, H, D]`` over positions ``0..T-1``."""
    t, d = x.shape[1], x.shape[-1]
    freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class LlamaBlock(nnx.Module):
    """Pre-RMSNorm causal block, grouped-query attention with RoPE, SwiGLU MLP: ``[B, T, d] -> [B, T, d]``."""

    def __init__(self, dim: int, heads: int, kv_heads: int, mlp: int, *, rngs: nnx.Rngs):
        if dim % heads or heads % kv_heads:
            raise ValueError(f"dim={dim} must divide by heads={heads}, and heads by kv_heads={kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1 = nnx.RMSNorm(dim, epsilon=1e-5, rngs=rngs)
        self.q = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.kv = nnx.Linear(dim, 2 * kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.norm2 = nnx.RMSNorm(dim, epsilon=1e-5, rngs=rngs)
        self.gate_up = nnx.Linear(dim, 2 * mlp, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(mlp, dim, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        kvh, hd, group = self.kv_heads, self.head_dim, self.heads // self.kv_heads
        h = self.norm1(x)
        q = _rope(self.q(h).reshape(b, t, self.heads, hd)).reshape(b, t, kvh, group, hd)
        k, v = jnp.split(self.kv(h).reshape(b, t, 2 * kvh, hd), 2, axis=2)
        k = _rope(k)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / jnp.sqrt(hd).astype(x.dtype)
        mask = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)
        attn = jnp.einsum("bkgqs,bskd->bqkgd", weights, v).reshape(b, t, d)
        x = x + self.o(attn)
        gate, up = jnp.split(self.gate_up(self.norm2(x)), 2, axis=-1)
        return x + self.down(jax.nn.silu(gate) * up)


class LlamaHead(nnx.Module):
    """Final RMSNorm and vocabulary projection: ``[B, T, d] -> [B, T, vocab]``."""

    def __init__(self, dim: int, vocab: int, *, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(dim, epsilon=1e-5, rngs=rngs)
        self.out = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.norm(x))


def _distinct_layers(name: str, rngs: nnx.Rngs) -> list[nnx.Module]:
    """Embedding, one block, head: the model's distinct layers at full width."""
    c = MODELS[name]
    if name == "gpt2-medium":
        return [models.Embed(c["vocab"], c["seq"], c["dim"], rngs=rngs),
                models.Block(c["dim"], c["heads"], rngs=rngs),
                models.Head(c["dim"], c["vocab"], rngs=rngs)]
    return [LlamaEmbed(c["vocab"], c["dim"], rngs=rngs),
            LlamaBlock(c["dim"], c["heads"], c["kv_heads"], c["mlp"], rngs=rngs),
            LlamaHead(c["dim"], c["vocab"], rngs=rngs)]


def _layer_times(prof: jaxpipe.Profile) -> dict:
    return {"forward_s": prof.forward().tolist(), "backward_s": prof.backward().tolist()}


def profile_model(name: str) -> tuple[jaxpipe.Profile, dict]:
    """Profiles the distinct layers, cached; returns the profile and how it was taken.

    Uncached: ``jaxpipe.profile`` runs PROFILE_RUNS times and each layer keeps
    its least forward and least backward time (each a median of REPEATS), the
    usual estimate of uncontended time on a shared machine; the combined
    profile goes to the cache, every run's times beside it (``*_runs.json``).
    Cached: one ``jaxpipe.profile`` call that returns the cache.
    """
    shape = MODELS[name]
    tokens = np.random.default_rng(0).integers(0, shape["vocab"], (PROFILED_ROWS, shape["seq"])).astype(np.int32)
    cache = RESULTS / f"scale_study_profile_{name}.json"
    runs_file = cache.with_name(cache.stem + "_runs.json")
    stamp = cache.stat().st_mtime_ns if cache.exists() else None
    load_before, start = os.getloadavg()[0], time.perf_counter()

    def run(path):
        return jaxpipe.profile(lambda rngs: _distinct_layers(name, rngs), tokens, PROFILED_ROWS,
                               repeats=REPEATS, warmup=WARMUP, cache=path)

    prof = run(cache)
    hit = stamp is not None and cache.stat().st_mtime_ns == stamp
    if not hit:
        runs = [prof] + [run(None) for _ in range(PROFILE_RUNS - 1)]
        forward = np.min([r.forward() for r in runs], axis=0)
        backward = np.min([r.backward() for r in runs], axis=0)
        prof = dataclasses.replace(prof, layers=tuple(
            dataclasses.replace(c, forward_s=float(f), backward_s=float(b))
            for c, f, b in zip(prof.layers, forward, backward)))
        prof.save(cache)
        runs_file.write_text(json.dumps([_layer_times(r) for r in runs], indent=1) + "\n")
    info = {"profile_seconds": time.perf_counter() - start, "cache_hit": hit,
            "load_average_1min_before_after": [load_before, os.getloadavg()[0]]}
    if runs_file.exists():
        info["profile_runs"] = json.loads(runs_file.read_text())
    return prof, info


def traced_residual_bytes(name: str) -> list[float]:
    """``[3]`` vjp residual bytes of the distinct layers for a PROFILED_ROWS-row micro-batch (abstract trace)."""
    layers = nnx.eval_shape(lambda: _distinct_layers(name, nnx.Rngs(0)))
    specs, params, _ = split_layers(layers)
    x = jax.ShapeDtypeStruct((PROFILED_ROWS, MODELS[name]["seq"]), np.int32)
    return residual_bytes(specs, params, trace_boundaries(specs, params, x))


def expand(prof: jaxpipe.Profile, residuals: list[float], blocks: int, source: str, rows: int = ROWS) -> dict:
    """Per-layer arrays of the full model for a ``rows``-row micro-batch: [embed, block x blocks, head].

    ``source="profiled"``: measured seconds. ``source="xla_flops"``: XLA's
    forward + backward flop estimate split 1:2 (the estimate is one number).
    """
    index = np.array([0] + [1] * blocks + [2])
    scale = rows / PROFILED_ROWS
    if source == "profiled":
        forward, backward = prof.forward(), prof.backward()
    else:
        flops = np.asarray([c.flops for c in prof.layers], dtype=np.float64)
        forward, backward = flops / 3, 2 * flops / 3
    names = [prof.layers[0].name] + [prof.layers[1].name] * blocks + [prof.layers[2].name]
    return dict(
        forward=forward[index] * scale, backward=backward[index] * scale, names=names, rows=rows,
        unit="s" if source == "profiled" else "flop", param_bytes=[prof.layers[i].param_bytes for i in index],
        # Largest activation of a micro-batch, as Pipeline passes it (the model input is smaller).
        message_bytes=float(max(c.activation_bytes for c in prof.layers)) * scale,
        hidden_bytes=float(prof.layers[1].activation_bytes) * scale,
        residual_bytes=[residuals[i] * scale for i in index],
    )


def _select(plan_candidates, label: str):
    return next((c for c in plan_candidates if c.label == label), None)


def _common(model: dict, num_devices: int, num_microbatches: int, message_bytes: float) -> dict:
    return dict(forward=model["forward"], backward=model["backward"], num_devices=num_devices,
                num_microbatches=num_microbatches, rows=model["rows"], param_bytes=model["param_bytes"],
                message_bytes=message_bytes, residual_bytes=model["residual_bytes"])


def candidates(model: dict, num_devices: int, num_microbatches: int) -> tuple[dict, str]:
    """The four compared candidates and the planner's pick (kind -> Candidate or None), and the pick's label."""
    common = _common(model, num_devices, num_microbatches, model["message_bytes"])
    num_layers = len(model["forward"])
    v = next((v for v in VIRTUAL if v * num_devices <= num_layers), None)
    chosen = {"gpipe": None, "1f1b": None, "interleaved": None, "balanced": None, "planner pick": None}
    try:
        plan = make_plan(**common, layer_names=model["names"], unit=model["unit"])
    except ValueError:
        # P > L: no integer cut; only fractional candidates exist (the cut make_plan uses).
        total = model["forward"] + model["backward"]
        stages = fractional_partition(total, num_devices, model["rows"], [True] * num_layers)
        cands = [predict(stages, order, 1, "fractional", **common, max_memory=None) for order in ("1f1b", "gpipe")]
        chosen["balanced"] = cands[0]
        best = min(cands, key=lambda c: c.step_time)
        chosen["planner pick"] = best
        return chosen, f"{best.label} (no integer cut: L={num_layers} < P={num_devices})"
    chosen["gpipe"] = _select(plan.candidates, "gpipe")
    chosen["1f1b"] = plan.plain
    chosen["balanced"] = _select(plan.candidates, "balanced")
    if v is not None:
        chosen["interleaved"] = _select(plan.candidates, f"interleaved V={v}")
    chosen["planner pick"] = plan.chosen
    return chosen, plan.chosen.label


def measure(cand, model: dict, num_devices: int, num_microbatches: int) -> dict:
    """Lock-step and event-driven step, bubble and imbalance idle of one candidate."""
    v, rows = cand.virtual_stages, model["rows"]
    fwd, bwd = cand.costs.per_stage(num_devices, v)
    equal = Costs(forward=np.full(fwd.shape, fwd.mean()), backward=np.full(bwd.shape, bwd.mean()))
    table = make_schedule(cand.schedule, num_devices, num_microbatches, v, fused=True)
    ticks = pack(table)
    lockstep, lockstep_equal = tick_time(ticks, fwd, bwd), tick_time(ticks, equal.forward, equal.backward)
    sim, sim_equal = simulate(table, cand.costs), simulate(table, equal)
    busy = float(sim.busy.sum())
    out = {"label": cand.label, "schedule": cand.schedule, "V": v, "cut": cand.cut}
    for key, t, t_eq in (("lockstep", cand.step_time, lockstep_equal), ("event", sim.makespan, sim_equal.makespan)):
        out[f"{key}_step"] = t
        out[f"{key}_equal_step"] = t_eq
        out[f"{key}_bubble"] = 1.0 - busy / (num_devices * t)
        out[f"{key}_imbalance_idle"] = t - t_eq
        out[f"{key}_imbalance_frac"] = (t - t_eq) / t
    # Candidate.step_time is the planner's lock-step number; re-timed here only to check the equal-stage baseline
    # is timed the same way (they differ only if planner.py stops timing packed fused ticks).
    out["planner_step_matches_packed_ticks"] = bool(np.isclose(cand.step_time, lockstep, rtol=1e-9))
    out["max_over_mean_load"] = float(np.max(cand.loads) / np.mean(cand.loads))
    out["memory_max_gib"] = float(np.max(cand.memory)) / 2**30
    # The same estimate if every stash slot held one hidden state (a block's output), not logits.
    hidden = predict(cand.stages, cand.schedule, v, cand.cut, max_memory=None, remat=cand.remat,
                     **_common(model, num_devices, num_microbatches, model["hidden_bytes"]))
    out["memory_hidden_msg_max_gib"] = float(np.max(hidden.memory)) / 2**30
    out["stage_layers"] = [round(sum((p.stop - p.start) / rows for p in s), 3) for s in cand.stages]
    return out


def _rows_for(model: dict, name: str, source: str, num_devices: int, num_mb: int) -> list[dict]:
    """One output row per compared candidate of one (model, cost source, P, M)."""
    cands, pick = candidates(model, num_devices, num_mb)
    base = {kind: measure(c, model, num_devices, num_mb) if c is not None else None for kind, c in cands.items()}
    plain, rows = base["1f1b"], []
    for kind, m in base.items():
        if m is None:
            continue
        row = {"model": name, "costs": source, "unit": model["unit"], "P": num_devices, "M": num_mb,
               "B": model["rows"], "kind": kind, **m}
        for key in ("lockstep", "event"):
            row[f"{key}_speedup_vs_1f1b"] = plain[f"{key}_step"] / m[f"{key}_step"] if plain else None
        if kind == "planner pick" and plain is None:
            row["label"] = pick
        rows.append(row)
    return rows


def study() -> dict:
    """Profiles both models and predicts every (model, cost source, P, M, candidate)."""
    results = {"config": {
        "seq": {name: shape["seq"] for name, shape in MODELS.items()}, "profiled_rows": PROFILED_ROWS,
        "rows_per_microbatch": ROWS, "dtype": "float32", "profile_repeats": REPEATS, "profile_warmup": WARMUP,
        "profile_runs": f"{PROFILE_RUNS} jaxpipe.profile runs, each layer's least forward and backward time",
        "P": list(PIPES), "M": [f"{k}P" for k in MICROBATCHES], "interleaved_V": list(VIRTUAL),
        "jax": jax.__version__, "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "cost_scaling": f"costs of a {ROWS}-row micro-batch = {ROWS // PROFILED_ROWS} x the profiled "
                        f"{PROFILED_ROWS}-row costs (linear in rows)",
        "cost_sources": {"profiled": "jaxpipe.profile median seconds",
                         "xla_flops": "XLA forward+backward flop estimate, split 1:2 into forward:backward"},
        "definitions": {
            "bubble": "1 - busy / (P * T), busy = summed compute of every action",
            "equal_step": "T of the same table with every (device, chunk) at the mean forward and mean "
                          "backward cost of the candidate's stages",
            "imbalance_idle": "T - equal_step (time lost because stages are unequal)",
            "imbalance_frac": "imbalance_idle / T; bubble - imbalance_frac is fill/drain (and lock-step) idle",
            "memory_max_gib": "planner.predict's estimate, max over devices, message = largest activation "
                              "(the logits) and traced residual bytes, as Pipeline passes them",
            "memory_hidden_msg_max_gib": "the same with message = one block output (hidden state)",
        },
    }, "models": {}, "rows": [], "row_granularity": []}
    for name, shape in MODELS.items():
        prof, info = profile_model(name)
        residuals = traced_residual_bytes(name)
        print(prof)
        emb, blk, head = prof.layers
        results["models"][name] = {
            "shape": shape, "layers": shape["blocks"] + 2, **info,
            "profiled_layers": [dict(name=c.name, forward_s=c.forward_s, backward_s=c.backward_s, flops=c.flops,
                                     param_bytes=c.param_bytes, activation_bytes=c.activation_bytes,
                                     residual_bytes=r)
                                for c, r in zip(prof.layers, residuals)],
            "head_over_block": (head.forward_s + head.backward_s) / (blk.forward_s + blk.backward_s),
            "head_over_block_flops": head.flops / blk.flops if head.flops and blk.flops else None,
            "embed_over_block": (emb.forward_s + emb.backward_s) / (blk.forward_s + blk.backward_s),
            "total_params": int((emb.param_bytes + shape["blocks"] * blk.param_bytes + head.param_bytes) // 4),
        }
        for source in COST_SOURCES:
            model = expand(prof, residuals, shape["blocks"], source)
            for num_devices in PIPES:
                for factor in MICROBATCHES:
                    results["rows"].extend(_rows_for(model, name, source, num_devices, factor * num_devices))
        for rows in GRANULARITY_ROWS:
            model = expand(prof, residuals, shape["blocks"], "profiled", rows)
            for num_devices in PIPES[-2:]:
                num_mb = MICROBATCHES[-1] * num_devices
                found = {r["kind"]: r for r in _rows_for(model, name, "profiled", num_devices, num_mb)}
                bal = found["balanced"]
                results["row_granularity"].append({
                    "model": name, "P": num_devices, "M": num_mb, "B": rows,
                    "balanced_max_over_mean_load": bal["max_over_mean_load"],
                    "balanced_lockstep_speedup_vs_1f1b": bal["lockstep_speedup_vs_1f1b"],
                    "balanced_lockstep_imbalance_frac": bal["lockstep_imbalance_frac"],
                })
    return results


CSV_FIELDS = ["model", "costs", "unit", "P", "M", "B", "kind", "label", "schedule", "V", "cut",
              "lockstep_step", "lockstep_equal_step", "lockstep_bubble", "lockstep_imbalance_idle",
              "lockstep_imbalance_frac", "lockstep_speedup_vs_1f1b",
              "event_step", "event_equal_step", "event_bubble", "event_imbalance_idle",
              "event_imbalance_frac", "event_speedup_vs_1f1b", "max_over_mean_load", "memory_max_gib",
              "memory_hidden_msg_max_gib", "planner_step_matches_packed_ticks", "stage_layers"]


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (" ".join(map(str, v)) if isinstance(v, list) else
                                 f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _find(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _series(rows, key, **match):
    """``(P, value)`` points of ``key`` over PIPES for rows matching ``match`` (M given as a factor of P)."""
    factor = match.pop("factor")
    pts = [(p, r[key]) for p in PIPES if (r := _find(rows, P=p, M=factor * p, **match)) and r[key] is not None]
    return tuple(zip(*pts)) if pts else ((), ())


def plot(results: dict, path: pathlib.Path) -> None:
    """Per model (columns): speed-up over plain 1F1B and lock-step idle fraction, vs P."""
    rows, names = results["rows"], list(MODELS)
    fig, axes = plt.subplots(2, len(names), figsize=(6.4 * len(names), 8.8), sharex=True)
    colours = {1: "tab:blue", 4: "tab:orange"}
    for col, name in enumerate(names):
        top = axes[0, col]
        for factor in MICROBATCHES:
            c, m = colours[factor], f"M={factor}P"
            sel = dict(model=name, costs="profiled", factor=factor)
            top.plot(*_series(rows, "lockstep_speedup_vs_1f1b", kind="balanced", **sel), "-o", color=c,
                     label=f"balanced, {m}, lock-step")
            top.plot(*_series(rows, "event_speedup_vs_1f1b", kind="balanced", **sel), "--o", color=c, alpha=0.5,
                     label=f"balanced, {m}, event-driven")
            top.plot(*_series(rows, "lockstep_speedup_vs_1f1b", kind="interleaved", **sel), ":^", color=c,
                     label=f"interleaved, {m}, lock-step")
            top.plot(*_series(rows, "lockstep_speedup_vs_1f1b", kind="balanced", model=name, costs="xla_flops",
                              factor=factor), "-x", color=c, alpha=0.35, lw=1,
                     label=f"balanced, {m}, lock-step, XLA-flop costs")
        info = results["models"][name]
        top.axhline(1.0, color="grey", lw=0.8)
        top.set_title(f"{name}: {info['layers']} layers; head = {info['head_over_block']:.2f} blocks "
                      f"profiled ({info['head_over_block_flops']:.2f} by XLA flops)", fontsize=10)
        top.set_ylabel("predicted speed-up over plain 1F1B")
        top.legend(fontsize=7, loc="upper left")
        if name == "gpt2-medium":
            top.annotate("P=32 > 26 layers:\nno integer cut", xy=(0.97, 0.05), xycoords="axes fraction",
                         ha="right", fontsize=8)
        ax = axes[1, col]
        for factor in MICROBATCHES:
            c, m = colours[factor], f"M={factor}P"
            for kind, style, marker, label in (("1f1b", "--", "s", "plain 1F1B"), ("balanced", "-", "o", "balanced")):
                sel = dict(model=name, costs="profiled", kind=kind, factor=factor)
                ax.plot(*_series(rows, "lockstep_bubble", **sel), style, marker=marker, color=c,
                        label=f"{label}, {m}: idle")
                ax.plot(*_series(rows, "lockstep_imbalance_frac", **sel), style, marker=marker, color=c,
                        alpha=0.35, markersize=4, label=f"{label}, {m}: from imbalance")
        gap = max(abs(r["lockstep_bubble"] - r["event_bubble"]) for r in rows
                  if r["model"] == name and r["costs"] == "profiled" and r["kind"] in ("1f1b", "balanced"))
        ax.set_title(f"event-driven idle within {gap:.2f} of these (CSV)", fontsize=9)
        ax.set_ylabel("idle fraction, lock-step (jaxpipe's executor)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
        axes[1, col].set_xlabel("pipe devices P")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(PIPES, [str(p) for p in PIPES])
            ax.grid(alpha=0.3)
    cfg = results["config"]
    seqs = ", ".join(f"{n} seq {s}" for n, s in cfg["seq"].items())
    fig.suptitle(f"Predicted by jaxpipe's planner cost model from per-layer costs profiled on {cfg['device']} "
                 f"({seqs}; micro-batch {cfg['rows_per_microbatch']} rows)\n"
                 "idle = 1 - busy/(P T); from imbalance = (T - T with equal stages) / T", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(results: dict) -> str:
    head = (f"{'model':12s} {'P':>3s} {'M':>4s} | {'lock-step speed-up vs plain 1F1B':^34s} | {'event':^13s} | "
            f"{'lock-step idle (imbal.)':^23s} | {'event idle (imbal.)':^23s} | {'max/mean':^11s} | "
            f"{'mem GiB':^11s} | planner pick")
    sub = (f"{'':12s} {'':>3s} {'':>4s} | {'gpipe':>6s} {'interl':>6s} {'balanc':>6s} {'flops':>6s} {'pick':>5s} | "
           f"{'interl':>6s} {'balanc':>6s} | {'1f1b':>11s} {'balanced':>11s} | {'1f1b':>11s} {'balanced':>11s} | "
           f"{'1f1b':>5s} {'bal':>5s} | {'1f1b':>5s} {'bal':>5s} |")
    lines = [head, sub]

    def fmt(r, key, width=6, spec=".2f"):
        return f"{r[key]:{width}{spec}}" if r is not None and r.get(key) is not None else f"{'-':>{width}s}"

    def idle(r, key):
        return (f"{r[key + '_bubble']:.2f} ({r[key + '_imbalance_frac'] + 0.0:.2f})".replace("-0.00", "0.00").rjust(11)
                if r is not None else f"{'-':>11s}")

    rows = results["rows"]
    for name in MODELS:
        for p in PIPES:
            for factor in MICROBATCHES:
                m = factor * p
                g = {k: _find(rows, model=name, costs="profiled", P=p, M=m, kind=k)
                     for k in ("gpipe", "1f1b", "interleaved", "balanced", "planner pick")}
                flops = _find(rows, model=name, costs="xla_flops", P=p, M=m, kind="balanced")
                lines.append(
                    f"{name:12s} {p:3d} {m:4d} | {fmt(g['gpipe'], 'lockstep_speedup_vs_1f1b')} "
                    f"{fmt(g['interleaved'], 'lockstep_speedup_vs_1f1b')} {fmt(g['balanced'], 'lockstep_speedup_vs_1f1b')} "
                    f"{fmt(flops, 'lockstep_speedup_vs_1f1b')} {fmt(g['planner pick'], 'lockstep_speedup_vs_1f1b', 5)} | "
                    f"{fmt(g['interleaved'], 'event_speedup_vs_1f1b')} {fmt(g['balanced'], 'event_speedup_vs_1f1b')} | "
                    f"{idle(g['1f1b'], 'lockstep')} {idle(g['balanced'], 'lockstep')} | "
                    f"{idle(g['1f1b'], 'event')} {idle(g['balanced'], 'event')} | "
                    f"{fmt(g['1f1b'], 'max_over_mean_load', 5)} {fmt(g['balanced'], 'max_over_mean_load', 5)} | "
                    f"{fmt(g['1f1b'], 'memory_max_gib', 5, '.1f')} {fmt(g['balanced'], 'memory_max_gib', 5, '.1f')} | "
                    f"{g['planner pick']['label']}"
                )
    lines.append("flops: balanced with XLA-flop costs instead of profiled times; mem: planner estimate "
                 "(stash slots sized to the logits)")
    lines.append("row granularity (profiled, M=4P): " + "; ".join(
        f"{g['model']} P={g['P']} B={g['B']}: max/mean {g['balanced_max_over_mean_load']:.2f}, "
        + (f"{g['balanced_lockstep_speedup_vs_1f1b']:.2f}x" if g["balanced_lockstep_speedup_vs_1f1b"] else "no plain")
        for g in results["row_granularity"]))
    return "\n".join(lines)


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = study()
    results["wall_seconds"] = time.perf_counter() - start
    (RESULTS / "scale_study.json").write_text(json.dumps(results, indent=1) + "\n")
    write_csv(results["rows"], RESULTS / "scale_study.csv")
    plot(results, RESULTS / "scale_study.png")
    if not all(r["planner_step_matches_packed_ticks"] for r in results["rows"]):
        print("WARNING: Candidate.step_time differs from tick_time(pack(make_schedule(..., fused=True)), "
              "Candidate.costs); the equal-stage numbers may not follow the planner's cost model")
    for name, info in results["models"].items():
        if max(info["load_average_1min_before_after"]) > (os.cpu_count() or 1) and not info["cache_hit"]:
            print(f"WARNING: {name} was profiled under load average {max(info['load_average_1min_before_after']):.1f} "
                  f"on {os.cpu_count()} cores; its times are noisy: delete its cache and re-run on a quiet machine")
        print(f"{name}: head/block cost {info['head_over_block']:.2f} (time), "
              f"{info['head_over_block_flops']:.2f} (XLA flops); embed/block {info['embed_over_block']:.2f}; "
              f"profiled in {info['profile_seconds']:.1f} s (cache {'hit' if info['cache_hit'] else 'miss'}, "
              f"load average {info['load_average_1min_before_after'][0]:.1f} -> "
              f"{info['load_average_1min_before_after'][1]:.1f})")
    print(summary(results))
    print(f"wall {results['wall_seconds']:.1f} s; wrote {RESULTS / 'scale_study.json'}, .csv, .png")


if __name__ == "__main__":
    main()
