"""ONNX preprocessing rewrites: one module per rewrite, each an onnx_ir pass the analyser runs in order.

:func:`autoprec.onnx.graph.preprocess` runs them on a model read from a file written by other
software: :mod:`.inline_functions`, (opset upgrade), :mod:`.fold_constants`,
:mod:`.fold_batch_norms`, :mod:`.name_nodes`, :mod:`.erf_gelu`, :mod:`.layer_norm`. Each module holds
one rewrite and says why it exists; :mod:`.base` holds what they share.
"""
