"""The torch-free core: formats, op kinds, the op graph, the lowering, plans, profiles, budgets, errors and files."""
