"""Sensitivity profiling: the output error of the model when one layer runs in one low format.

Two modes, both over the calibration batches:

``exact``
    One fp32 pass caches every node's value. Each trial (layer L, format P) recomputes L with the
    rounding of P (:func:`autoprec.torch.semantics.emulate_layer`) and re-runs only the nodes downstream
    of L, reading everything else from the cache. A re-run stops early when the perturbation has
    been absorbed (every changed value equal to its fp32 value again), e.g. by a ReLU or max-pool.

``fast``
    One forward and one backward pass with a random probe give a first-order (Fisher) estimate for
    all layers and formats at once. For logits the probe is a label sampled from the model's own
    output distribution, so E[(g . d)^2] = d^T F d ~ 2 KL for a perturbation d of any tensor the
    gradient g is taken at. For values the probe is a Gaussian vector r, so E[(g . d)^2] = |J d|^2.
    The perturbations d are the real rounding errors of each format at the layer's inputs, weight
    and output, so overflow and fp8 flushing show up as they would in exact mode.

The error measure is "kl" (mean KL divergence per output position, nats) for classifier-like
outputs and "rel_mse" (|y'-y|^2 / |y|^2) otherwise. A model with several outputs (every floating
tensor it returns, :class:`autoprec.core.stats.Outputs`, or those its ``OUTPUTS`` names) gets the
sum of its outputs' errors, each in its own measure ("kl+rel_mse" when both kinds are summed); in
fast mode one backward pass serves all outputs (see :func:`_probe`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten_with_path, tree_leaves, tree_map

from autoprec.torch.capture import Captured
from autoprec.core.cache import ResultCache, cache_root, code_fingerprint, fingerprint
from autoprec.core.errors import UsageError
from autoprec.core.formats import DEFAULT_CANDIDATES, Precision
from autoprec.core.kinds import LOOKUP_KINDS
from autoprec.core.lowering import single_layer_roundings
from autoprec.torch.quantize import quantize
from autoprec.core.kinds import act_arg_positions
from autoprec.torch.semantics import (LayerFormat, bias_view, emulate_layer, finish, lookup_rows, quantize_activation, quantize_weight, split_bias, weight_arg_position, weight_channels)
from autoprec.core.sensitivity import LayerRanges, SensitivityProfile
from autoprec.core.stats import NOT_FINITE, DeclaredKinds, ErrorSum, Outputs, Progress, RangeAccumulator, explain, output_name


FP16 = Precision.FP16
E4M3 = Precision.FP8_E4M3


# --- running an fx graph node by node ---------------------------------------------------------


class GraphRunner:
    """Evaluates a normalised GraphModule node by node, so values can be cached and overridden."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self._downstream: dict[str, list[fx.Node]] = {}

    def value_of(self, node: fx.Node, env: dict[str, Any], args_of: Callable[[Any], Any]) -> Any:
        if node.op == "placeholder":
            return env[node.name]
        return self.call(node, fx.node.map_arg(node.args, args_of), fx.node.map_arg(node.kwargs, args_of))

    def call(self, node: fx.Node, args: Any, kwargs: Any) -> Any:
        """``node`` computed as the module computes it, on argument values already looked up."""
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "output":
            return args[0]
        raise RuntimeError(f"unknown fx op {node.op}")

    def run(self, inputs: tuple[Any, ...],
            layer_hook: Callable[[fx.Node, tuple[Any, ...], dict[str, Any]], Any] | None = None) -> dict[str, Any]:
        """All node values for one batch. ``layer_hook(node, args, kwargs)`` may compute layers."""
        env: dict[str, Any] = {}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        for n, x in zip(placeholders, inputs):
            env[n.name] = x
        lookup = lambda a: env[a.name]  # noqa: E731
        for n in self.nodes:
            if n.op == "placeholder":
                continue
            if layer_hook is not None and n.meta.get("autoprec_layer"):
                args = fx.node.map_arg(n.args, lookup)
                kwargs = fx.node.map_arg(n.kwargs, lookup)
                env[n.name] = layer_hook(n, args, kwargs)
            else:
                env[n.name] = self.value_of(n, env, lookup)
        return env

    def model_output(self, value: Any) -> Any:
        """The output node's ``value`` structured as the module returns it. A graph from
        torch.export returns its outputs flat and rebuilds their pytree in its code generator; the
        outputs' names (:func:`model_outputs`) are paths in that structure."""
        return self.gm.graph._codegen.process_outputs(value)

    def downstream(self, name: str) -> list[fx.Node]:
        """Nodes that depend on ``name``, in execution order (cached)."""
        if name not in self._downstream:
            seen: set[str] = set()
            stack = [u for u in self.nodes[self.index[name]].users]
            while stack:
                u = stack.pop()
                if u.name in seen:
                    continue
                seen.add(u.name)
                stack.extend(u.users)
            self._downstream[name] = sorted((self.nodes[self.index[s]] for s in seen),
                                            key=lambda n: self.index[n.name])
        return self._downstream[name]

    def rerun(self, env: dict[str, Any], name: str, value: Any,
              round_after: Mapping[str, Precision] | None = None) -> tuple[Any, int]:
        """Model output when node ``name`` takes ``value``; only downstream nodes are recomputed.

        ``round_after`` maps FOLLOW ops that the plan runs in a 16-bit format to that format:
        their results are rounded, exactly as the applied plan computes them.
        Returns (output, number of nodes recomputed). Stops early once no value differs from the
        cached fp32 run: the output is then the cached one.
        """
        rounding = round_after or {}
        changed: dict[str, Any] = {name: value}
        lookup = lambda a: changed[a.name] if a.name in changed else env[a.name]  # noqa: E731
        count = 0
        for n in self.downstream(name):
            if not any(a.name in changed for a in n.all_input_nodes):
                continue
            v = self.value_of(n, env, lookup)
            if n.name in rounding:
                v = tree_map(lambda t: quantize(t, rounding[n.name]) if torch.is_tensor(t) else t, v)
            count += 1
            if n.op != "output" and torch.is_tensor(v) and torch.equal(v, env[n.name]):
                continue  # this path absorbed the perturbation
            changed[n.name] = v
            # drop values no remaining node reads (keeps memory flat on long graphs)
        out_node = self.nodes[-1]
        if out_node.name in changed:
            return changed[out_node.name], count
        return env[out_node.name], count


def _np(t: torch.Tensor) -> Any:
    """A tensor as the fp32 numpy array the profile statistics (:mod:`autoprec.core.stats`) take."""
    return t.detach().to(torch.float32).cpu().numpy()


# --- the model's outputs ----------------------------------------------------------------------


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The model's outputs in one result ``out``: every floating tensor leaf, in pytree order
    (:mod:`torch.utils._pytree`), the order :meth:`Outputs.pick` selects from."""
    return [leaf for leaf in tree_leaves(out) if torch.is_tensor(leaf) and leaf.is_floating_point()]


def model_outputs(out: Any, wanted: Sequence[str] | None = None, declared: DeclaredKinds = None) -> Outputs:
    """Which outputs of a model count, read off one result ``out`` structured as the model returns
    it: each floating tensor leaf named by its pytree path ("0", "logits", "aux.0"), those in
    ``wanted`` (None: all) selected, each of the kind ``declared`` for it or decided by its shape."""
    named = [(path, leaf) for path, leaf in tree_flatten_with_path(out)[0]
             if torch.is_tensor(leaf) and leaf.is_floating_point()]
    return Outputs.resolve([output_name([_key_part(k) for k in path]) for path, _ in named],
                           [tuple(leaf.shape) for _, leaf in named], wanted, declared)


def selected_outputs(outputs: Outputs, out: Any) -> list[torch.Tensor]:
    """The tensors of the outputs that count in one result ``out`` (structured, or flat in the same order)."""
    return outputs.pick(output_tensors(out))


def _key_part(key: Any) -> str:
    """One step of a pytree path: a sequence index, a mapping key or an attribute name (namedtuple)."""
    for attr in ("idx", "key", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


# --- error measures ----------------------------------------------------------------------------


@dataclass
class _LayerInfo:
    node: fx.Node
    kind: str
    act_pos: tuple[int, ...]
    weight_pos: int | None

    @property
    def weight_batch_term(self) -> bool:
        """Whether fast mode counts the weight's rounding as a term of its own. A lookup's output is
        rows of its weight, so its output term already holds that rounding (per sample)."""
        return self.weight_pos is not None and self.kind not in LOOKUP_KINDS


def _layers(captured: Captured, only: Iterable[str] | None = None) -> list[_LayerInfo]:
    """The layers to profile (every layer is trialled in every profiled format)."""
    wanted = set(only) if only is not None else None
    out = []
    for op in captured.graph.layers():
        if wanted is not None and op.name not in wanted:
            continue
        node = captured.node(op.name)
        node.meta["autoprec_layer"] = True
        out.append(_LayerInfo(node, op.kind, act_arg_positions(op.kind), weight_arg_position(op.kind)))
    return out


def _time_reference(gm: fx.GraphModule, batches: list[tuple[Any, ...]]) -> float:
    """Seconds of one plain fp32 forward pass over the calibration data (best of 3)."""
    best = math.inf
    with torch.no_grad():
        for _ in range(3):
            t0 = time.perf_counter()
            for b in batches:
                gm(*b)
            best = min(best, time.perf_counter() - t0)
    return best


def profile(
    captured: Captured,
    batches: list[tuple[Any, ...]],
    formats: Iterable[Precision] = DEFAULT_CANDIDATES,
    mode: str = "exact",
    output_kind: DeclaredKinds = None,
    layers: Iterable[str] | None = None,
    progress: Progress | None = None,
    seed: int = 0,
    time_reference: bool = True,
    outputs: Sequence[str] | None = None,
    cache: ResultCache | None = None,
) -> SensitivityProfile:
    """Profile every layer (or ``layers``) of ``captured`` in each of ``formats``.

    ``batches`` are the calibration batches (tuples of inputs); ``output_kind`` is "logits",
    "values" (for every output), a dict output name -> kind, or None (each decided from its
    shape). ``outputs``: the names of the outputs whose errors count (a model file's ``OUTPUTS``;
    None: every floating output). ``time_reference``: also time plain fp32 forward passes to
    express the profile's cost in them (``cost_passes``; 0 when skipped). ``cache``: results
    kept from an earlier run of the same model, data and settings (:func:`profile_cache`): a whole
    profile is reused, and an exact profile reuses each layer finished before (a killed run resumes).
    """
    fmts = tuple(f for f in formats if f is not Precision.FP32)
    if not fmts:
        raise UsageError("no low-precision format to profile: give at least one of bf16, fp16, fp8")
    if mode not in ("exact", "fast"):
        raise UsageError(f"unknown profile mode {mode!r}: use 'exact' or 'fast'")
    if not batches:
        raise UsageError("no calibration batches to profile on")
    if cache is not None:
        whole = cache.get("profile")
        if whole is not None:
            return SensitivityProfile.from_dict(whole)
    infos = _layers(captured, layers)
    runner = GraphRunner(captured.gm)
    # FOLLOW ops the plan {layer: fmt} runs in 16-bit (e.g. a GELU after a bf16 linear): each trial
    # rounds their results too, so a trial computes exactly what the applied plan computes.
    roundings = single_layer_roundings(captured.graph, [i.node.name for i in infos], fmts)
    t_ref = _time_reference(captured.gm, batches) if time_reference else 0.0
    t0 = time.perf_counter()
    if mode == "exact":
        errors, local, ranges, measured, samples, rerun_frac = _profile_exact(
            runner, infos, fmts, batches, (outputs, output_kind), progress, roundings, cache)
        calibration: dict[str, Any] = {}
    else:
        errors, ranges, measured, samples, envs = _profile_fast(runner, infos, fmts, batches, (outputs, output_kind),
                                                                progress, seed, roundings)
        local, rerun_frac = {}, 0.0
        errors, calibration = _calibrate(runner, infos, fmts, batches, (outputs, output_kind), roundings, errors,
                                         (envs, ranges))
    seconds = time.perf_counter() - t0
    prof = SensitivityProfile(
        model_name=captured.graph.model_name,
        fingerprint=captured.graph.fingerprint(),
        mode=mode,
        measure=measured.measure,
        formats=fmts,
        errors=errors,
        ranges=ranges,
        local_errors=local,
        samples=samples,
        cost_passes=seconds / t_ref if t_ref > 0 else 0.0,
        rerun_fraction=rerun_frac,
        seconds=seconds,
        calibration=calibration,
    )
    prof.flags = explain(prof)
    if cache is not None:
        cache.put("profile", prof.to_dict())
    return prof


def profile_cache(captured: Captured, batches: list[tuple[Any, ...]], settings: Mapping[str, Any],
                  source: bytes = b"") -> ResultCache | None:
    """The cache of profiles of this model (its graph and every stored tensor), these calibration
    batches, autoprec's code and ``settings`` (mode, formats, outputs...); ``source``: the model
    file's bytes, for results that depend on its functions. None when the cache is off."""
    root = cache_root()
    if root is None:
        return None
    parts: list[bytes | str] = [code_fingerprint(), captured.graph.fingerprint(),
                                json.dumps(settings, sort_keys=True, default=str), source]
    for name, t in sorted(captured.gm.state_dict().items()):
        parts += [name, str(t.dtype), str(tuple(t.shape)), _tensor_bytes(t)]
    for b in batches:
        for x in tree_leaves(b):
            parts += [str(type(x).__name__), _tensor_bytes(x) if torch.is_tensor(x) else repr(x)]
    return ResultCache(root, fingerprint(*parts))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _collect_ranges(info: _LayerInfo, args: tuple[Any, ...], out: torch.Tensor,
                    accs: dict[str, list[RangeAccumulator]]) -> None:
    """Add one batch of a layer's activation inputs, output (and weight, once) to its accumulators."""
    lst = accs.setdefault(info.node.name, [RangeAccumulator() for _ in range(len(info.act_pos) + 2)])
    for j, pos in enumerate(info.act_pos):
        lst[j].add(_np(args[pos]))
    lst[len(info.act_pos)].add(_np(out))
    if info.weight_pos is not None and lst[-1].count == 0:
        lst[-1].add(_np(args[info.weight_pos]), final=True)


def _finish_ranges(infos: list[_LayerInfo], accs: dict[str, list[RangeAccumulator]]) -> dict[str, LayerRanges]:
    out = {}
    for info in infos:
        lst = accs[info.node.name]
        k = len(info.act_pos)
        out[info.node.name] = LayerRanges(
            inputs=tuple(a.finish() for a in lst[:k]),
            output=lst[k].finish(),
            weight=lst[-1].finish() if info.weight_pos is not None else None,
        )
    return out


_Roundings = dict[tuple[str, Precision], dict[str, Precision]]
#: the outputs a profile asks for: (names of those that count or None for all, declared kinds)
_Wanted = tuple[Sequence[str] | None, DeclaredKinds]


#: the fp32 pass exact trials start from: every node's value per batch, and the layers' ranges
_Reference = tuple[list[dict[str, Any]], dict[str, LayerRanges]]


def _reference(runner: GraphRunner, infos: list[_LayerInfo], batches: list[tuple[Any, ...]]) -> _Reference:
    """One fp32 pass over ``batches`` keeping every node's value, and the range statistics of ``infos``."""
    accs: dict[str, list[RangeAccumulator]] = {}
    envs: list[dict[str, Any]] = []
    with torch.no_grad():
        for b in batches:
            def hook(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                info = next((i for i in infos if i.node is node), None)
                if info is None:  # a layer this profile leaves out: as the module computes it
                    return runner.call(node, args, kwargs)
                out = emulate_layer(info.kind, args, kwargs, LayerFormat(Precision.FP32))
                _collect_ranges(info, args, out, accs)
                return out
            envs.append(runner.run(b, hook if infos else None))
    return envs, _finish_ranges(infos, accs)


def _profile_exact(runner: GraphRunner, infos: list[_LayerInfo], fmts: tuple[Precision, ...],
                   batches: list[tuple[Any, ...]], wanted: _Wanted, progress: Progress | None,
                   roundings: _Roundings, cache: ResultCache | None = None, reference: _Reference | None = None):
    """Exact trials of ``infos`` in ``fmts``; ``reference``: the fp32 pass they start from when one
    was made already (the fast profile's, for its calibration trials), else it is made here."""
    envs, ranges = reference if reference is not None else _reference(runner, infos, batches)
    with torch.no_grad():
        out_name = runner.nodes[-1].name
        measured = model_outputs(runner.model_output(envs[0][out_name]), *wanted)
        outputs = [[_np(y) for y in selected_outputs(measured, env[out_name])] for env in envs]
        if not all(bool(np.isfinite(y).all()) for ys in outputs for y in ys):
            raise UsageError(NOT_FINITE)
        prepared = [[ErrorSum(k).reference(y) for k, y in zip(measured.kinds, ys)] for ys in outputs]
        errors: dict[str, dict[Precision, float]] = {}
        local: dict[str, dict[Precision, float]] = {}
        total = len(infos) * len(fmts)
        done = 0
        recomputed = 0
        graph_nodes = sum(1 for n in runner.nodes if n.op not in ("placeholder", "get_attr", "output"))
        for info in infos:
            errors[info.node.name] = {}
            local[info.node.name] = {}
            kept = cache.get(f"exact-{info.node.name}") if cache is not None else None
            if kept is not None and set(kept["errors"]) == {f.value for f in fmts}:
                for fmt in fmts:  # finished by an earlier run of this very profile
                    errors[info.node.name][fmt] = float(kept["errors"][fmt.value])
                    local[info.node.name][fmt] = float(kept["local"][fmt.value])
                done += len(fmts)
                if progress:
                    progress(done, total, f"{info.node.name} (cached)")
                continue
            for fmt in fmts:
                lf = LayerFormat(fmt, tuple(r.amax for r in ranges[info.node.name].inputs))
                accs = [ErrorSum(k) for k in measured.kinds]  # one per output: the error is their sum
                own = ErrorSum("values")
                wq = None
                for bi, env in enumerate(envs):
                    args = fx.node.map_arg(info.node.args, lambda a: env[a.name])
                    kwargs = fx.node.map_arg(info.node.kwargs, lambda a: env[a.name])
                    if wq is None and info.weight_pos is not None and torch.is_tensor(args[info.weight_pos]):
                        wq = quantize_weight(args[info.weight_pos], fmt, weight_channels(info.kind, args, kwargs))
                    val = emulate_layer(info.kind, args, kwargs, lf, weight_q=wq)
                    own.add(_np(env[info.node.name]), _np(val))
                    out, count = runner.rerun(env, info.node.name, val, roundings[(info.node.name, fmt)])
                    recomputed += count + 1
                    for acc, ref, new, prep in zip(accs, outputs[bi], selected_outputs(measured, out), prepared[bi]):
                        acc.add(ref, _np(new), prep)
                errors[info.node.name][fmt] = sum(acc.value() for acc in accs)
                local[info.node.name][fmt] = math.sqrt(own.value())
                done += 1
                if progress:
                    progress(done, total, f"{info.node.name} {fmt}")
            if cache is not None:
                cache.put(f"exact-{info.node.name}",
                          {"errors": {f.value: errors[info.node.name][f] for f in fmts},
                           "local": {f.value: local[info.node.name][f] for f in fmts}})
    samples = sum(_batch_size(b) for b in batches)
    frac = recomputed / max(1, total * len(batches) * graph_nodes)
    return errors, local, ranges, measured, samples, frac


#: exact trials that put the fast profile on the exact profile's scale (its most sensitive layers)
CALIBRATION_TRIALS = 3


def _calibrate(runner: GraphRunner, infos: list[_LayerInfo], fmts: tuple[Precision, ...],
               batches: list[tuple[Any, ...]], wanted: _Wanted, roundings: _Roundings,
               errors: dict[str, dict[Precision, float]],
               reference: _Reference) -> tuple[dict[str, dict[Precision, float]], dict[str, Any]]:
    """The fast estimates multiplied by one factor that puts them on the exact profile's scale.

    The fast profile ranks layers well, but its absolute scale can be far off (5,400x too small on
    digits_resnet), so plan.json's predicted errors and the Pareto plot would not mean what they say.
    An exact trial of each of the :data:`CALIBRATION_TRIALS` layers the fast profile finds most
    sensitive in the narrowest format (largest errors: least noise) gives the factor, the geometric
    mean of exact / fast over the trials where both are positive; one factor keeps the ranking, and
    the search, which learns its exchange rate to the metric from measurements, decides the same.
    The trials start from the fast profile's own forward pass (``reference``), so they cost only
    their partial re-runs."""
    fmt = max(fmts, key=lambda f: f.rank)
    ranked = sorted((i for i in infos if 0 < errors[i.node.name][fmt] < math.inf),
                    key=lambda i: (-errors[i.node.name][fmt], i.node.name))[:CALIBRATION_TRIALS]
    if not ranked:
        return errors, {"scale": 1.0, "trials": []}
    exact, *_ = _profile_exact(runner, ranked, (fmt,), batches, wanted, None, roundings, reference=reference)
    trials = [{"layer": i.node.name, "format": fmt.value, "fast": errors[i.node.name][fmt],
               "exact": exact[i.node.name][fmt]} for i in ranked]
    logs = [math.log(t["exact"] / t["fast"]) for t in trials if 0 < t["exact"] < math.inf]
    scale = math.exp(sum(logs) / len(logs)) if logs else 1.0
    scaled = {n: {f: v * scale for f, v in e.items()} for n, e in errors.items()}
    return scaled, {"scale": scale, "trials": trials}


def _batch_size(b: tuple[Any, ...]) -> int:
    for x in b:
        if torch.is_tensor(x) and x.dim() > 0:
            return int(x.shape[0])
    return 1


class _Tap(torch.autograd.Function):
    """Identity whose output is a fresh tensor: its gradient is the gradient through one layer only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


def _per_sample_dot(g: torch.Tensor, d: torch.Tensor, batch: int | None) -> torch.Tensor:
    """Per-sample dot products g . d (float64) when dim 0 is the ``batch``; else one for the whole
    tensor (``batch`` None: a weight).

    Either is unbiased for sum_s (g_s . d_s)^2 under the probe (cross terms have zero mean); the
    per-sample split only lowers the variance. One fused pass (``linalg.vecdot``) accumulating in
    fp32: its relative error (~1e-6 of the dot) is far below the probe's own noise, and it costs
    half of a float64 product-and-sum, the largest part of the fast profile's arithmetic.
    """
    rows = batch if batch is not None and d.dim() >= 1 and d.shape[0] == batch and g.shape == d.shape else 1
    if rows == 1:
        g, d = _dense_order(g, d)
    return torch.linalg.vecdot(g.reshape(rows, -1), d.reshape(rows, -1)).double()


def _dense_order(g: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``g`` and ``d`` with their dimensions in memory order where both are the same permuted
    layout (a transposed weight and its gradient), so that flattening them copies nothing: the dot
    product of the whole tensors does not depend on the order (a copy of each was 1.3 s of GPT-2's
    profile at 124M parameters)."""
    if g.shape != d.shape or g.stride() != d.stride() or g.is_contiguous():
        return g, d
    order = sorted(range(g.dim()), key=lambda i: -g.stride(i))
    return g.permute(order), d.permute(order)


def _rounding_delta(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q - x. Values already infinite in fp32 (e.g. -inf in masked attention scores) round to
    themselves: their inf - inf is 0, not NaN. An overflow (finite x, infinite q) stays infinite and
    makes the estimate infinite."""
    return torch.nan_to_num(q - x, nan=0.0, posinf=math.inf, neginf=-math.inf)


def _delta_dot(g: torch.Tensor, x: torch.Tensor, q: torch.Tensor, batch: int | None) -> torch.Tensor:
    """:func:`_per_sample_dot` of ``g`` and the rounding's change ``q - x``. A finite result proves
    every change finite, so :func:`_rounding_delta`'s extra pass is only paid where an infinity is
    (an overflow, or a value infinite already), and then the result is what it gives."""
    dot = _per_sample_dot(g, q - x, batch)
    if bool(torch.isfinite(dot).all()):
        return dot
    return _per_sample_dot(g, _rounding_delta(x, q), batch)


def _profile_fast(runner: GraphRunner, infos: list[_LayerInfo], fmts: tuple[Precision, ...],
                  batches: list[tuple[Any, ...]], wanted: _Wanted, progress: Progress | None, seed: int,
                  roundings: _Roundings):
    gen = torch.Generator().manual_seed(seed)
    accs: dict[str, list[RangeAccumulator]] = {}
    saved: list[dict[str, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]]] = []
    # every node's fp32 value per batch, for the calibration's exact trials: most are the layers'
    # inputs and outputs kept below anyway (a detached tensor shares its storage)
    envs: list[dict[str, Any]] = []
    # each layer's weight term (g_W . dW)^2 per format and batch, computed as the batch runs
    wterms: dict[str, dict[Precision, list[float]]] = {i.node.name: {f: [] for f in fmts} for i in infos
                                                       if i.weight_batch_term}
    followed = sorted({n for r in roundings.values() for n in r})
    fsaved: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    out_name = runner.nodes[-1].name
    measured: Outputs | None = None  # known from the first batch's output
    weights: list[float] | None = None
    norms: list[float] = []  # per output: what its E[(g . d)^2] is divided by (see _fisher_error)
    biases: dict[str, torch.Tensor | None] = {}  # a layer's bias (a parameter: the same in every batch)
    params = dict(runner.gm.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        for bi, b in enumerate(batches):
            taps: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}

            def hook(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                info = next(i for i in infos if i.node is node)
                a = list(args)
                ins = []
                for pos in info.act_pos:
                    src = a[pos]
                    # graph inputs carry no grad: a leaf copy gives the layer its own input gradient
                    t = _Tap.apply(src) if src.requires_grad else src.detach().requires_grad_(True)
                    if not t.is_leaf:
                        t.retain_grad()
                    a[pos] = t
                    ins.append(t)
                out = emulate_layer(info.kind, tuple(a), kwargs, LayerFormat(Precision.FP32))
                if not out.requires_grad:  # a lookup in a buffer: no input carries a gradient
                    out.requires_grad_(True)
                out.retain_grad()
                taps[node.name] = (ins, out)
                bias = split_bias(info.kind, args, kwargs)[2]
                biases[node.name] = bias.detach() if bias is not None else None
                _collect_ranges(info, tuple(x.detach() if torch.is_tensor(x) else x for x in a), out.detach(), accs)
                return out

            for p in params.values():
                p.grad = None
            env = runner.run(b, hook)
            for n in followed:  # the rounding of a FOLLOW result reaches every consumer of it
                if torch.is_tensor(env[n]) and env[n].requires_grad:
                    env[n].retain_grad()
            if measured is None:
                measured = model_outputs(runner.model_output(env[out_name]), *wanted)
                weights = _probe_weights(runner, batches, measured)
                norms = [0.0] * len(measured)
            ys = selected_outputs(measured, env[out_name])
            if not all(bool(torch.isfinite(y).all()) for y in ys):
                raise UsageError(NOT_FINITE)
            probe = _probe(ys, measured.kinds, weights, gen, norms)
            if probe.requires_grad:  # else no layer reaches the outputs that count: every gradient is 0
                probe.backward()
            saved.append({name: ([t.detach() for t in ins], [t.grad if t.grad is not None else torch.zeros_like(t)
                                                              for t in ins], out.detach(),
                                 out.grad if out.grad is not None else torch.zeros_like(out))
                          for name, (ins, out) in taps.items()})
            _add_weight_terms(runner, infos, fmts, wterms)
            envs.append({n: tree_map(lambda v: v.detach() if torch.is_tensor(v) else v, v) for n, v in env.items()})
            fsaved.append({n: (env[n].detach(), env[n].grad if env[n].grad is not None else torch.zeros_like(env[n]))
                           for n in followed if torch.is_tensor(env[n]) and env[n].requires_grad})
            if progress:
                progress(bi + 1, len(batches) + len(infos), f"forward/backward batch {bi + 1}")
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None
    assert measured is not None  # set by the first batch; profile() refuses an empty list
    ranges = _finish_ranges(infos, accs)
    errors: dict[str, dict[Precision, float]] = {}
    with torch.no_grad():
        for li, info in enumerate(infos):
            name = info.node.name
            amaxes = tuple(r.amax for r in ranges[name].inputs)
            errors[name] = {}
            for fmt in fmts:
                total = 0.0
                for bi, per in enumerate(saved):
                    ins, gins, out, gout = per[name]
                    batch = _batch_size(batches[bi])
                    term = _delta_dot(gout, out, _output_in(info, out, fmt, biases.get(name)), batch)
                    for j, (x, g) in enumerate(zip(ins, gins)):
                        d = _delta_dot(g, x, quantize_activation(x, fmt, amaxes[j] if fmt.needs_scale else None), batch)
                        term = term + d if d.shape == term.shape else term.sum() + d.sum()
                    for n, rf in roundings[(name, fmt)].items():
                        if n in fsaved[bi]:
                            v, g = fsaved[bi][n]
                            d = _delta_dot(g, v, quantize(v, rf), batch)
                            term = term + d if d.shape == term.shape else term.sum() + d.sum()
                    total += float((term ** 2).sum())
                    if name in wterms:
                        total += wterms[name][fmt][bi]
                if math.isnan(total) or math.isinf(total):
                    errors[name][fmt] = math.inf
                elif weights is None:  # one output, unscaled probe
                    errors[name][fmt] = _fisher_error(measured.kinds[0], total, norms[0])
                else:  # the probe's scaling already summed the outputs' errors
                    errors[name][fmt] = total
            if progress:
                progress(len(batches) + li + 1, len(batches) + len(infos), name)
    samples = sum(_batch_size(b) for b in batches)
    return errors, ranges, measured, samples, envs


def _normaliser(kind: str, y: torch.Tensor) -> float:
    """One batch's share of what an output's E[(g . d)^2] is divided by: its positions (logits),
    or |y|^2 (values)."""
    if kind == "logits":
        return float(y.numel() // y.shape[-1])
    return float((y.detach().double() ** 2).sum())


def _fisher_error(kind: str, total: float, norm: float) -> float:
    """An output's error measure from ``total``, E[(g . d)^2] summed over the batches, and
    ``norm``, its normaliser summed over them: for logits E = d^T F d ~ 2 KL summed over
    positions, so KL per position is total / (2 positions); for values E = |J d|^2, so the
    rel_mse is total / |y|^2."""
    if kind == "logits":
        return 0.5 * total / max(norm, 1)
    return total / norm if norm > 0 else 0.0


def _probe_weights(runner: GraphRunner, batches: list[tuple[Any, ...]], measured: Outputs) -> list[float] | None:
    """The scale of each output's probe (:func:`_probe`), sqrt of its error per unit of
    E[(g . d)^2]; None for one output, whose probe is not scaled (its total is normalised at the end).

    The scale depends on the normaliser over all calibration batches, while each batch's probe needs
    it before that batch's backward pass: one fp32 forward pass over the batches (no gradients)
    measures it first. Only models with several outputs that count pay for it.
    """
    if len(measured) == 1:
        return None
    norms = [0.0] * len(measured)
    with torch.no_grad():
        for b in batches:
            for o, (kind, y) in enumerate(zip(measured.kinds, selected_outputs(measured, runner.gm(*b)))):
                norms[o] += _normaliser(kind, y)
    return [math.sqrt(_fisher_error(kind, 1.0, n)) for kind, n in zip(measured.kinds, norms)]


def _probe(ys: list[torch.Tensor], kinds: tuple[str, ...], weights: list[float] | None, gen: torch.Generator,
           norms: list[float]) -> torch.Tensor:
    """One batch's probe: a scalar whose gradient g satisfies E[(g . d)^2] = the output error of a
    small perturbation d of any tensor g is taken at. Adds each output's normaliser to ``norms``.

    Per output ``y``: for logits the log-probability of labels sampled from the model's own
    distribution (E[(g . d)^2] = d^T F d ~ 2 KL summed over positions); for values y . r with a
    Gaussian r (E[(g . d)^2] = |J d|^2). With several outputs each one's probe p_o is scaled by
    ``weights[o]`` = sqrt(c_o), c_o its error per unit of E[(g_o . d)^2], and the probe is their
    sum: the probes are independent with zero-mean gradients, so the cross terms of
    (sum_o sqrt(c_o) g_o . d)^2 have zero mean and E[(g . d)^2] = sum_o c_o E[(g_o . d)^2], the
    sum of the outputs' errors, from one backward pass.
    """
    terms = []
    for o, (y, kind) in enumerate(zip(ys, kinds)):
        if kind == "logits":
            logp = torch.log_softmax(y.float(), dim=-1)
            flat = logp.detach().reshape(-1, y.shape[-1]).exp()
            labels = torch.multinomial(flat, 1, generator=gen).reshape(y.shape[:-1] + (1,))
            term = logp.gather(-1, labels).sum()
        else:
            r = torch.randn(y.shape, generator=gen, dtype=y.dtype)
            term = (y * r).sum()
        norms[o] += _normaliser(kind, y)
        terms.append(term if weights is None else term * weights[o])
    probe = terms[0]
    for term in terms[1:]:
        probe = probe + term
    return probe


def _output_in(info: _LayerInfo, out: torch.Tensor, fmt: Precision, bias: torch.Tensor | None) -> torch.Tensor:
    """The fp32 output ``out`` of a layer with only its output rounding of ``fmt`` applied (its
    input and weight roundings are terms of their own): :func:`autoprec.torch.semantics.finish` of the
    product ``out - bias`` (exact to fp32 rounding). A lookup's output is rows of its table, so its
    output in ``fmt`` is those rows rounded as the table is (per-row scales in fp8), then to the
    layer's output format."""
    if info.kind in LOOKUP_KINDS:
        return lookup_rows(out, fmt)
    if bias is None:
        return quantize(out, fmt.compute_output)
    return finish(info.kind, out - bias_view(info.kind, bias), bias, fmt)


def _weight_node(info: _LayerInfo) -> fx.Node | None:
    if info.weight_pos is None:
        return None
    w = info.node.args[info.weight_pos]
    return w if isinstance(w, fx.Node) and w.op == "get_attr" else None


def _weight_value(runner: GraphRunner, info: _LayerInfo) -> torch.Tensor | None:
    w = _weight_node(info)
    return runner.value_of(w, {}, lambda a: None).detach() if w is not None else None


def _add_weight_terms(runner: GraphRunner, infos: list[_LayerInfo], fmts: tuple[Precision, ...],
                      wterms: dict[str, dict[Precision, list[float]]]) -> None:
    """Append one batch's weight term (g_W . dW)^2 of each layer in ``wterms`` and format: computed
    while the batch's weight gradients are there, so that no batch's gradients are kept (they are
    the size of the model: 0.5 GB a batch for GPT-2 at 124M parameters)."""
    with torch.no_grad():
        for info in infos:
            if info.node.name not in wterms:
                continue
            w = _weight_value(runner, info)
            p = runner.value_of(_weight_node(info), {}, lambda a: None) if w is not None else None
            channels = weight_channels(info.kind, info.node.args, info.node.kwargs)
            # no gradient (the layer reaches no output that counts): zeros, so an overflow still shows
            g = None if p is None else p.grad if p.grad is not None else torch.zeros_like(p)
            for fmt in fmts:
                term = 0.0
                if w is not None and g is not None:
                    term = float(_delta_dot(g, w, quantize_weight(w, fmt, channels), None)) ** 2
                wterms[info.node.name][fmt].append(term)


# --- explanations -------------------------------------------------------------------------------


