# The two entry points of README.md. Both set up .venv first (fast when already set up).
.PHONY: setup demo test bench

setup:
	@./scripts/setup.sh

demo: setup
	.venv/bin/autoprec tune models/char_transformer.py --budget 0.5% --out out/char_transformer

test: setup
	.venv/bin/python -m pytest -q -n 2

# every benchmark, then BENCHMARKS.md from their sections (hours on a 2-core CPU; see benchmarks/write_benchmarks.py)
bench: setup
	.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench]"
	./scripts/setup_modelopt.sh
	.venv/bin/python benchmarks/write_benchmarks.py
