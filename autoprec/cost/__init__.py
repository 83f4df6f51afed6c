"""Cost models: targets, the roofline model and provider pricing (torch-free)."""
