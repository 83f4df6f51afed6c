"""The one place that opens ONNX Runtime sessions.

``onnxruntime-gpu`` lists the CUDA and TensorRT providers even on a machine without a GPU, and a
session that asks for them silently runs on the CPU instead (after printing a library-loading error
to stderr). :func:`open_session` therefore reads back what the session really got
(``session.get_providers()``), exposes it as :attr:`Session.provider`, and logs one plain warning
line when it is not what was asked for. ORT's own stderr chatter during session creation is
captured and logged at debug level.

Every session gets the same graph-optimizer settings, chosen for autoprec's fp8 graphs (checked on
onnxruntime 1.31, CPU provider): the ``ReluQuantRewrite`` / ``ClipQuantRewrite`` rules are disabled
(they delete a ReLU or Clip in front of a QuantizeLinear, which is only right for an integer zero
point; with an fp8 zero point the negative values then survive), and so are the QDQ fusions
(``session.disable_quant_qdq``: they rewrite fp8 Q/DQ around a MatMul into an integer kernel and
the session fails to load). ``LayerNormFusionL1`` is disabled too: it fuses a decomposed layer norm
(ReduceMean/Sub/Pow/.../Div, as exporters before opset 17 write it) and takes the Cast in front of it
along, so that behind a bf16 rounding (Cast to bf16, Cast back to fp32) the fused op binds bf16 and
fp32 to one type and the session fails to load. (The ONNX analyser fuses the layer norms it can
match itself, :func:`autoprec.onnx.graph.fuse_layer_norms`; this is for the forms it leaves.)

CUDA sessions are opened with ``use_tf32=0``: since onnxruntime 1.17 the CUDA provider otherwise
runs fp32 MatMul/Gemm (cuBLAS) and Conv (cuDNN) on TF32 tensor cores, which round their inputs to
10 mantissa bits, so a layer the plan keeps in fp32 would not be fp32, and the fp32 baseline's
metric and latency would be TF32's. TensorRT has no such session option; only the process-wide
``NVIDIA_TF32_OVERRIDE=0`` turns TF32 off there, and autoprec leaves that to the user. They are
also opened with ``fuse_conv_bias=0`` (ORT's default, pinned): ORT folds a 16-bit Conv's bias Add
back into the Conv (``ConvAddFusion``), and only unfused does its CUDA Conv add the bias after
rounding the product, as a 16-bit layer's rule has it (:mod:`autoprec.onnx.passes.split_bias`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from autoprec.core.errors import UsageError

log = logging.getLogger(__name__)

PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "cpu": "CPUExecutionProvider"}
_SHORT = {v: k for k, v in PROVIDERS.items()}
#: what "auto" asks for, in order: CUDA when it works, else CPU (TensorRT only when named: building
#: its engines takes minutes)
AUTO = ("cuda", "cpu")
#: graph rewrites that are wrong for fp8 zero points or bf16 roundings (see the module docstring)
DISABLED_OPTIMIZERS = ("ReluQuantRewrite", "ClipQuantRewrite", "LayerNormFusionL1")
OPTIMIZATION = ("all", "extended", "basic", "none")
#: provider options autoprec sets (see the module docstring: fp32 stays fp32 on the GPU, and a 16-bit
#: Conv adds its bias after rounding its product)
PROVIDER_OPTIONS: dict[str, dict[str, str]] = {"cuda": {"use_tf32": "0", "fuse_conv_bias": "0"}}

_warned: set[tuple[str, str]] = set()
#: severity for ONNX Runtime's process-wide default logger, set by :func:`set_runtime_log` (None: ORT's own)
_log_severity: int | None = None
#: the source file, line and C++ function ORT writes in front of an error's reason
_ORT_SOURCE = re.compile(r"\S+\.(?:cc|cpp|h):\d+ (?:\S+\(.*?\)(?: const)? )?")
#: numpy types of the float tensor types ORT's Python API feeds (it has none for bf16)
_NUMPY_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class Session:
    """An ORT session and the provider it really runs on."""

    session: Any  # onnxruntime.InferenceSession
    provider: str  # short name of the first provider the session got: "cuda", "tensorrt" or "cpu"
    requested: tuple[str, ...]  # short names asked for, in order
    reason: str = ""  # why the first requested provider was not used ("" when it was)

    @property
    def fell_back(self) -> bool:
        return bool(self.requested) and self.provider != self.requested[0]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @functools.cached_property
    def _declared_floats(self) -> dict[str, Any]:
        """numpy type of each float graph input (read once: runs are a hot path when profiling)."""
        return {i.name: _NUMPY_FLOATS[i.type] for i in self.session.get_inputs() if i.type in _NUMPY_FLOATS}

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run on named inputs (``outputs``: the values to return, default the graph's outputs). A
        floating array takes the graph's declared float type first: an fp16 input gets fp32 data
        rounded to fp16, as a caller feeding fp16 would round it."""
        return self.session.run(None if outputs is None else list(outputs), self.typed(feeds))

    def typed(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` with each floating array in its input's declared float type."""
        def one(name: str, v: np.ndarray) -> np.ndarray:
            want = self._declared_floats.get(name)
            return v.astype(want, copy=False) if want is not None and np.issubdtype(v.dtype, np.floating) else v

        return {k: one(k, v) for k, v in feeds.items()}

    def __call__(self, *inputs: Any) -> list[np.ndarray]:
        """Run on positional inputs (numpy arrays or torch tensors), in the graph's input order."""
        names = self.input_names
        if len(inputs) != len(names):
            raise UsageError(f"the ONNX model takes {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}")
        return self.run({n: _to_numpy(x) for n, x in zip(names, inputs)})

    def describe(self) -> str:
        if not self.fell_back:
            return f"ONNX Runtime on {self.provider}"
        return f"ONNX Runtime on {self.provider} (asked for {self.requested[0]}: {self.reason})"


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def parse_providers(providers: str | Sequence[str]) -> tuple[str, ...]:
    """Short provider names from "auto", "cuda,cpu", ("tensorrt", "cuda", "cpu") or ORT's long names."""
    if isinstance(providers, str):
        if providers.strip().lower() == "auto":
            return AUTO
        providers = [p for p in providers.split(",") if p.strip()]
    out: list[str] = []
    for p in providers:
        key = str(p).strip()
        short = _SHORT.get(key, key.lower())
        if short not in PROVIDERS:
            raise UsageError(f"unknown ONNX Runtime provider {p!r}: use auto or a list of {', '.join(PROVIDERS)}")
        if short not in out:
            out.append(short)
    if not out:
        raise UsageError("no ONNX Runtime provider named: use auto, cuda, tensorrt or cpu")
    if "cpu" not in out:
        out.append("cpu")  # ORT falls back to it anyway; say so explicitly
    return tuple(out)


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Capture what native code writes to file descriptor 2 and what Python code prints (ORT prints
    its provider fallbacks); yield a list that receives the text. File descriptor 2 is the process's:
    open sessions from one thread at a time while this runs."""
    out: list[str] = []
    printed = io.StringIO()
    try:
        fd = os.dup(2)
    except OSError:  # no usable stderr: capture the Python side only
        with contextlib.redirect_stdout(printed):
            yield out
        out.append(printed.getvalue())
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            os.dup2(tmp.fileno(), 2)
            with contextlib.redirect_stdout(printed):
                yield out
        finally:
            os.dup2(fd, 2)
            os.close(fd)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))
            out.append(printed.getvalue())


def _why_not(text: str, wanted: str) -> str:
    m = re.search(r"Failed to load library \S*?(libonnxruntime_providers_\w+)\.so with error: ([^\n\x1b]+)", text)
    if m:
        return f"its library does not load: {m.group(2).strip()}"
    if wanted != "cpu":
        return "not usable on this machine (no GPU, or its CUDA libraries are missing)"
    return ""


def set_runtime_log(debug: bool) -> None:
    """How much ONNX Runtime's process-wide logger prints while sessions run (the CLI's ``--debug``).

    Session creation is captured already (:func:`open_session`'s ``quiet``), but a run logs through
    ORT's default logger: on the CUDA provider (onnxruntime 1.31, H100) the cuDNN frontend logs
    "No execution plans support the graph" as an error while it picks the algorithm of a 16-bit
    convolution, and the session then runs it (the deployed models' parity and metric on the GPU
    are those of the emulation). Without ``debug`` only fatal lines are shown; a failed run still
    raises with ORT's message. Applied to the sessions opened from now on (ORT is imported lazily)."""
    global _log_severity
    _log_severity = 2 if debug else 4


def _ort_error(exc: Exception) -> str:
    """ORT's message without the source location and C++ signature it prefixes to the reason
    ("/onnxruntime_src/.../model.cc:256 onnxruntime::Model::Model(...) Unsupported model IR version")."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    last = _ORT_SOURCE.sub("", text.splitlines()[-1])
    return last[:300]


def open_session(path_or_bytes: str | os.PathLike[str] | bytes, providers: str | Sequence[str] = "auto", *,
                 optimization: str = "all", threads: int | None = None, quiet: bool = True) -> Session:
    """Open an ORT session on the first usable provider of ``providers``; report what it got.

    ``providers``: "auto" (CUDA, else CPU) or names in order of preference ("tensorrt", "cuda",
    "cpu"). ``optimization``: ORT graph optimization level (all, extended, basic, none).
    ``threads``: intra-op threads (ORT's default when None). ``quiet``: capture ORT's stderr (and the
    fallback notices it prints) during session creation and log them at debug level.
    """
    import onnxruntime as ort

    wanted = parse_providers(providers)
    if _log_severity is not None:
        ort.set_default_logger_severity(_log_severity)
    if optimization not in OPTIMIZATION:
        raise UsageError(f"unknown optimization level {optimization!r}: use one of {', '.join(OPTIMIZATION)}")
    available = set(ort.get_available_providers())
    asked = [PROVIDERS[p] for p in wanted if PROVIDERS[p] in available]
    short = [_SHORT[a] for a in asked]
    missing = [p for p in wanted if PROVIDERS[p] not in available]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    ctx = _captured_output() if quiet else contextlib.nullcontext([])
    with ctx as captured, _model_source(path_or_bytes) as model:
        try:
            sess = ort.InferenceSession(model, so, providers=asked,
                                        provider_options=[PROVIDER_OPTIONS.get(p, {}) for p in short],
                                        disabled_optimizers=list(DISABLED_OPTIMIZERS))
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented)
            err = _ort_error(exc)
            raise UsageError(f"ONNX Runtime cannot open the model on {', '.join(_SHORT.get(a, a) for a in asked)}: "
                             f"{err}") from exc
    text = "".join(captured)
    if text.strip():
        log.debug("onnxruntime stderr while opening the session:\n%s", text.strip())
    got = _SHORT.get(sess.get_providers()[0], sess.get_providers()[0])
    reason = ""
    if got != wanted[0]:
        reason = ("not in this onnxruntime build" if wanted[0] in missing else _why_not(text, wanted[0]))
        key = (wanted[0], got)
        if key not in _warned:
            _warned.add(key)
            log.warning("asked ONNX Runtime for %s, got %s: %s", PROVIDERS[wanted[0]], PROVIDERS.get(got, got), reason)
    return Session(sess, got, wanted, reason)


#: serialized models above this size are opened from a temporary file (see :func:`_model_source`)
SPILL_BYTES = 32 * 2 ** 20


@contextlib.contextmanager
def _model_source(path_or_bytes: str | os.PathLike[str] | bytes) -> Iterator[str | bytes]:
    """What ``ort.InferenceSession`` is given for ``path_or_bytes``: a path as a string; small bytes
    as they are; bytes above :data:`SPILL_BYTES` written to a temporary file whose path is given
    (removed once the session is open). onnxruntime's Python session keeps the bytes it was opened
    from for its whole life, so a 124M-parameter model's bytes would stay resident beside the
    session's own copy of its weights; from a path it keeps nothing."""
    if not isinstance(path_or_bytes, bytes):
        yield str(Path(path_or_bytes))
        return
    if len(path_or_bytes) <= SPILL_BYTES:
        yield path_or_bytes
        return
    fd, name = tempfile.mkstemp(suffix=".onnx", prefix="autoprec-session-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(path_or_bytes)
        yield name
    finally:
        os.unlink(name)


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


@functools.lru_cache(maxsize=None)
def _probe(wanted: tuple[str, ...]) -> tuple[str, str]:
    s = open_session(_probe_model(), wanted)
    return s.provider, s.reason


def probe_provider(providers: str | Sequence[str] = "auto") -> tuple[str, str]:
    """(provider a session asking for ``providers`` really gets, why not the first) from a tiny model."""
    return _probe(parse_providers(providers))


def cuda_available() -> bool:
    """Whether a session asking for CUDA really runs on CUDA here."""
    return probe_provider(("cuda", "cpu"))[0] == "cuda"


def _runner(session: Session, feeds: Mapping[str, np.ndarray], resident: bool) -> Any:
    """A callable running ``session`` once on ``feeds``: ``session.run`` on host arrays, or with
    ``resident`` (on a GPU provider) through an IOBinding whose inputs and outputs stay on the GPU."""
    if not resident or session.provider == "cpu":
        return functools.partial(session.run, feeds)
    import onnxruntime as ort

    binding = session.session.io_binding()
    for name, value in session.typed(feeds).items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0))
    for name in session.output_names:
        binding.bind_output(name, "cuda")
    return functools.partial(session.session.run_with_iobinding, binding)


def repeat_to(array: np.ndarray, n: int) -> np.ndarray:
    """``array``'s samples (axis 0) repeated, then cut, to ``n``: a batch of the size to time."""
    return np.concatenate([array] * (n // len(array) + 1))[:n]


def latencies_ms(models: Sequence[bytes], feeds: Sequence[Mapping[str, np.ndarray]], provider: str = "cuda", *,
                 resident: bool = False, warmup: int = 10, runs: int = 60, rounds: int = 6) -> list[float | None]:
    """Median wall time (ms) of one run of each of ``models`` (on its ``feeds``) on ``provider``;
    None for a model ONNX Runtime does not really run there (a CUDA request on a machine without a
    GPU), so that no CPU time is ever reported as GPU latency.

    The models are timed in turn, ``rounds`` times ``runs / rounds`` runs each after ``warmup`` runs,
    so that a drift of the machine (GPU clocks, a busy host) falls on all of them alike rather than
    on whichever is timed last; the median is over all of a model's runs.

    By default a run is ``session.run`` on host arrays, as an application calls it: on a GPU that
    includes copying the inputs to the device and the outputs back, which a large input (a batch of
    224x224 images) makes a sizeable share of the time whatever the plan. ``resident=True`` keeps
    inputs and outputs on the GPU (ORT's IOBinding), so the time is the graph's alone: the figure
    a precision plan changes. ORT synchronises the device at the end of each run either way."""
    import statistics
    import time

    want = parse_providers(provider)[0]
    steps: list[Any] = []
    for model, feed in zip(models, feeds, strict=True):
        session = open_session(model, (provider,))
        steps.append(_runner(session, feed, resident) if session.provider == want else None)
    times: list[list[float]] = [[] for _ in steps]
    for step in steps:
        for _ in range(warmup if step else 0):
            step()
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for step, got in zip(steps, times):
            for _ in range(per_round if step else 0):
                t = time.perf_counter()
                step()
                got.append(time.perf_counter() - t)
    return [1000 * statistics.median(t) if t else None for t in times]


def latency_ms(model: bytes, feeds: Mapping[str, np.ndarray], provider: str = "cuda", *, resident: bool = False,
               warmup: int = 10, runs: int = 60) -> float | None:
    """:func:`latencies_ms` of one model."""
    return latencies_ms([model], [feeds], provider, resident=resident, warmup=warmup, runs=runs)[0]


def ort_module(session: Session) -> Any:
    """``session`` as a torch module: takes torch tensors, returns a torch tensor (the first output;
    a tuple when the graph has several). Model files' evaluate() functions can call it."""
    import torch

    class OrtModule(torch.nn.Module):
        """A torch-callable wrapper of an ONNX Runtime session; it runs on the CPU side.

        Its one parameter is empty: it says where inputs go (``next(model.parameters()).device``,
        the idiom evaluate() functions use) and holds no weight."""

        def __init__(self) -> None:
            super().__init__()
            self.session = session
            self.device_marker = torch.nn.Parameter(torch.empty(0), requires_grad=False)

        def forward(self, *inputs: Any) -> Any:
            # fp16 outputs (a graph exported with fp16 outputs) widen to fp32, exactly, for the metric
            outs = [torch.from_numpy(np.ascontiguousarray(o.astype(np.float32) if o.dtype == np.float16 else o))
                    for o in session(*inputs)]
            return outs[0] if len(outs) == 1 else tuple(outs)

        def extra_repr(self) -> str:
            return session.describe()

    return OrtModule().eval()
