"""Local-function inlining: every call of a model-local function becomes the nodes of its body.

Why: torch's TorchScript exporter writes one function per module with
``export_modules_as_functions=True``; a layer inside a function body would be out of reach of the
plan (a call is one node of an unknown op). onnx_ir's ``InlinePass`` inlines the calls, nested ones
included: the inlined nodes keep their body's names, made unique with ``_<n>`` suffixes, and their
own metadata, completed by the call site's. Functions nothing calls any more are removed with them.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass

from autoprec.core.errors import CaptureError, first_line
from autoprec.onnx.rewrites.base import Rewrite, RewriteResult


class InlineFunctions(Rewrite):
    """Inline the model's local functions; the result counts the functions the model had. Raises
    CaptureError when they cannot be inlined."""

    def call(self, model: ir.Model) -> RewriteResult:
        count = len(model.functions)
        if not count:
            return RewriteResult(model, False, 0)
        try:
            InlinePass()(model)
            RemoveUnusedFunctionsPass()(model)
        except Exception as exc:  # precondition errors (recursive functions), opset mismatches, ...
            raise CaptureError(f"cannot inline the model's {count} local function(s): {first_line(exc)} "
                               f"(export the model without functions)") from exc
        return RewriteResult(model, True, count)
