"""The torch frontend: the model contract, capture, batch-norm folding, numerics, profiling and the fx passes."""
