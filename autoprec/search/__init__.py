"""Search: pick a format per layer that minimises the estimated cost within an error budget (torch-free)."""
