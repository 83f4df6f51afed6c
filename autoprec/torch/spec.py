"""The model-file contract (documented in models/README.md) and its loader.

A model file is a Python module with:

- ``model() -> nn.Module``: the network with its trained weights loaded, in eval mode;
- ``example_inputs() -> tuple[Tensor, ...]``: one batch of inputs, used for capture and shapes;
- ``calibration_data() -> Iterable[batch]``: batches of inputs (a Tensor or a tuple of Tensors);
- ``evaluate(model) -> float``: the metric on held-out data (optional: models without it are
  tuned on fidelity to the fp32 model);
- ``METRIC`` (str, e.g. "accuracy") and ``HIGHER_IS_BETTER`` (bool), required with evaluate();
- optional ``OUTPUT``: "logits" (classifier-like, the default when an output's last dim > 1)
  or "values" (regression-like), for every output; or a dict output name -> kind;
- optional ``OUTPUTS``: the names of the outputs the errors and the fidelity metric count, e.g.
  ``("logits",)``: every floating tensor the model returns is an output, named by its path in
  what forward() returns ("0", "1" for a tuple, "logits", "aux.0" for a dict); default: all;
- optional ``train_data()`` and ``loss(model, batch)`` for training in the tuned precision.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

from autoprec.core.errors import AutoprecError, ModelSpecError, UsageError, first_line
from autoprec.core.stats import DeclaredKinds, check_output_contract

_REQUIRED = ("model", "example_inputs", "calibration_data")


@dataclass(frozen=True)
class ModelSpec:
    """A loaded model file. ``evaluate`` is None for fidelity-only models."""

    name: str
    path: Path
    module: ModuleType
    metric: str | None
    higher_is_better: bool
    output_kind: DeclaredKinds  # "logits" | "values" | {output name: kind} | None (decide from each output's shape)
    outputs: tuple[str, ...] | None = None  # names of the outputs that count (OUTPUTS); None: every floating output
    weights: Path | None = None  # a state_dict (``autoprec train``'s weights.pt) loaded into model()

    def model(self) -> Any:
        """A fresh module from the file's ``model()``, checked: an nn.Module whose floating
        parameters and buffers are float32 (the plans' reference format)."""
        import torch

        net = self._call("model")
        if not isinstance(net, torch.nn.Module):
            raise ModelSpecError(f"{self.path}: model() returned {type(net).__name__}, not a torch.nn.Module")
        for name, t in (*net.named_parameters(), *net.named_buffers()):
            if t.is_floating_point() and t.dtype != torch.float32:
                raise ModelSpecError(f"{self.path}: model() holds {name} as {str(t.dtype).removeprefix('torch.')}; "
                                     "autoprec tunes float32 models (return the model after .float())")
        if self.weights is not None:
            load_weights(net, self.weights)
        return net

    def _call(self, function: str) -> Any:
        """The model file's ``function()``; what it raises is a one-line error naming the file (an
        exit stays an exit: the CLI reports it with the file and line)."""
        try:
            return getattr(self.module, function)()
        except (AutoprecError, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise ModelSpecError(f"{self.path}: {function}() raised {type(exc).__name__}: {first_line(exc, 200)}") from exc

    def with_weights(self, path: str | Path | None) -> "ModelSpec":
        """This model file with the weights saved at ``path`` (None: its own)."""
        if path is None:
            return self
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"weights file not found: {p} (give the weights.pt written by `autoprec train`)")
        return replace(self, weights=p)

    def example_inputs(self) -> tuple[Any, ...]:
        return _checked_batch(as_tuple(self._call("example_inputs")), f"{self.path}: example_inputs()")

    def calibration_data(self) -> list[tuple[Any, ...]]:
        """Materialised so every stage sees the same batches in the same order."""
        data = self._call("calibration_data")
        try:
            items = list(data)
        except TypeError:
            raise ModelSpecError(f"{self.path}: calibration_data() returned {type(data).__name__}; return a list of "
                                 "batches (each a tensor or a tuple of tensors)") from None
        batches = [_checked_batch(as_tuple(b), f"{self.path}: calibration_data() batch {i}")
                   for i, b in enumerate(items)]
        if not batches:
            raise ModelSpecError(f"{self.path}: calibration_data() yielded no batches; return at least one")
        return batches

    @property
    def evaluate(self) -> Callable[[Any], float] | None:
        return getattr(self.module, "evaluate", None)

    @property
    def has_training(self) -> bool:
        return callable(getattr(self.module, "train_data", None)) and callable(getattr(self.module, "loss", None))


def load_weights(net: Any, path: Path) -> None:
    """Load the state_dict saved at ``path`` into ``net``; a file that does not fit is a one-line error."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"{path} is not a readable weights file ({type(exc).__name__}: {first_line(exc, 120)})") from exc
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds no state_dict (a mapping of tensor names to tensors)")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"{path} does not fit the model: {first_line(exc, 200)}; were these weights trained for "
                         "another model?") from None


def _checked_batch(batch: tuple[Any, ...], what: str) -> tuple[Any, ...]:
    """``batch`` unless it holds numpy arrays, which a torch model cannot take: say so."""
    for x in batch:
        if type(x).__module__ == "numpy":
            raise ModelSpecError(f"{what} holds a numpy {type(x).__name__}: give torch tensors (torch.from_numpy)")
    return batch


def as_tuple(batch: Any) -> tuple[Any, ...]:
    """A batch of inputs as a tuple of positional arguments."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def load_model_spec(path: str | Path) -> ModelSpec:
    """Import a model file and check it follows the contract; raise a one-line error otherwise."""
    p = Path(path)
    if p.suffix == ".onnx":
        raise UsageError(f"{p}: ONNX models are tuned with --data inputs.npz; this command needs a model.py")
    if p.is_dir():
        raise UsageError(f"{p} is a folder: give the path of a model .py file (e.g. models/digits_cnn.py)")
    if not p.is_file():
        raise UsageError(f"model file not found: {p} (give the path of a model .py file, e.g. models/digits_cnn.py)")
    if p.suffix != ".py":
        raise UsageError(f"{p}: expected a Python model file ending in .py")
    module = _import_file(p)
    missing = [f for f in _REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise ModelSpecError(f"{p}: missing {', '.join(missing)}(); see models/README.md for the model contract")
    evaluate = getattr(module, "evaluate", None)
    metric = getattr(module, "METRIC", None)
    higher = getattr(module, "HIGHER_IS_BETTER", None)
    if evaluate is not None:
        if not callable(evaluate):
            raise ModelSpecError(f"{p}: evaluate must be a function evaluate(model) -> float")
        if not isinstance(metric, str) or not isinstance(higher, bool):
            raise ModelSpecError(
                f"{p}: evaluate() needs METRIC = '<name>' and HIGHER_IS_BETTER = True/False beside it")
    output_kind = getattr(module, "OUTPUT", None)
    outputs = getattr(module, "OUTPUTS", None)
    malformed = check_output_contract(outputs, output_kind)
    if malformed:
        raise ModelSpecError(f"{p}: {malformed}")
    return ModelSpec(
        name=p.stem,
        path=p.resolve(),
        module=module,
        metric=metric if evaluate is not None else None,
        higher_is_better=bool(higher) if evaluate is not None else True,
        output_kind=output_kind,
        outputs=tuple(outputs) if outputs is not None else None,
    )


def model_spec(model: Any, example_inputs: Any, calibration: Iterable[Any],
               evaluate: Callable[[Any], float] | None = None, metric: str | None = None,
               higher_is_better: bool = True, name: str | None = None) -> ModelSpec:
    """A live ``nn.Module`` as a :class:`ModelSpec`, so everything that takes a model file takes it too
    (a notebook user holding a Hugging Face model has no model file).

    ``example_inputs``: one batch (a tensor or a tuple of positional tensors); ``calibration``: an
    iterable or DataLoader of such batches, read once here (keep it small: about 4 batches);
    ``evaluate(model) -> float``: the metric on held-out data, named ``metric`` (its direction
    ``higher_is_better``); without it the model is tuned on fidelity to its fp32 outputs. The
    module is used as it is, not copied: capture and export do not change it but set eval mode.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if evaluate is not None and not callable(evaluate):
        raise UsageError("evaluate must be a function evaluate(model) -> float")
    label = name or type(model).__name__
    batches = [as_tuple(b) for b in calibration]
    if not batches:
        raise UsageError(f"{label}: calibration yielded no batches; give at least one")
    example = as_tuple(example_inputs)
    module = ModuleType(f"autoprec_live_{label}")
    module.model = lambda: model  # type: ignore[attr-defined]
    module.example_inputs = lambda: example  # type: ignore[attr-defined]
    module.calibration_data = lambda: list(batches)  # type: ignore[attr-defined]
    if evaluate is not None:
        module.evaluate = evaluate  # type: ignore[attr-defined]
    return ModelSpec(name=label, path=Path(f"<{label}>"), module=module,
                     metric=(metric or "metric") if evaluate is not None else None,
                     higher_is_better=higher_is_better if evaluate is not None else True, output_kind=None)


def _import_file(p: Path) -> ModuleType:
    """Import ``p`` under a private module name, with its folder importable for sibling helpers."""
    mod_name = f"autoprec_model_{p.stem}_{abs(hash(str(p.resolve()))) % 10**8}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, p)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"{p}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(p.resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    except SystemExit as exc:  # a script, not a model file: it must not end autoprec
        sys.modules.pop(mod_name, None)
        raise ModelSpecError(f"{p}: the model file called sys.exit({exc.code!r}) while being imported; a model file "
                             "defines functions (put script code under `if __name__ == \"__main__\":`)") from None
    except Exception as exc:  # the user's file failed: say where, keep it one line
        sys.modules.pop(mod_name, None)
        raise ModelSpecError(f"{p}: importing the model file failed: {type(exc).__name__}: {first_line(exc)}") from exc
    finally:
        if added:
            sys.path.remove(folder)
    return module

