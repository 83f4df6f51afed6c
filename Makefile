# The two entry points of README.md. Both set up .venv first (fast when already set up).
.PHONY: setup demo test bench

setup:
	@./scripts/setup.sh

demo: setup
	.venv/bin/autoprec tune models/char_transformer.py --budget 0.5% --out out/char_transformer

test: setup
	.venv/bin/python -m pytest -q -n 2

bench: setup
	.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench]"
	.venv/bin/python benchmarks/peers_bench.py
	.venv/bin/python benchmarks/profile_bench.py
	.venv/bin/python benchmarks/tune_bench.py
	.venv/bin/python benchmarks/deploy_bench.py
	.venv/bin/python benchmarks/onnx_input_bench.py
	.venv/bin/python benchmarks/bias_rounding.py
	.venv/bin/python benchmarks/scale_fusion.py
	.venv/bin/python benchmarks/ort_overhead.py
	.venv/bin/python benchmarks/frontend_pricing.py
	.venv/bin/python benchmarks/gpt2_scale.py
	.venv/bin/python benchmarks/onnx_zoo_bench.py
	.venv/bin/python benchmarks/train_bench.py
