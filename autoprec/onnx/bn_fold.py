"""Fold inference batch norms of an ONNX ModelProto into the Conv before them (:mod:`autoprec.core.bn_fold`'s arithmetic).

The fold itself is the onnx_ir pass :class:`autoprec.onnx.rewrites.fold_batch_norms.FoldBatchNorms`
(the analyser runs it among its preprocessing rewrites); this is its entry point for callers that
hold a ``ModelProto``, as the torch model's export (:mod:`autoprec.deploy.export`) does.
"""

from __future__ import annotations

import onnx

from autoprec.onnx.rewrites.base import apply_to_proto
from autoprec.onnx.rewrites.fold_batch_norms import FoldBatchNorms, FoldBatchNormsResult


def fold_onnx_batch_norms(model: onnx.ModelProto) -> list[str]:
    """Fold every ``Conv -> BatchNormalization`` pair of ``model``'s main graph in place (see
    :class:`FoldBatchNorms` for when a pair folds); return the folded norms' node names."""
    result = apply_to_proto(FoldBatchNorms(), model)
    assert isinstance(result, FoldBatchNormsResult)
    return list(result.norms)
