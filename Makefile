# Two commands do everything on a fresh machine:  make demo   and   make test
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-unit demo bench bench-world clean

setup:
	@bash tools/provision.sh
	@bash tools/provision_browser.sh

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)") $(if $(UNLEARNED),--unlearned "$(UNLEARNED)") $(if $(OUT),--out "$(OUT)") $(if $(TRAIN_STEPS),--train-steps $(TRAIN_STEPS))

bench: setup
	$(PY) benchmarks/run_all.py

# Every defence in the miniature world through a real server (issue 8); BENCH_ARGS e.g. --retrain
bench-world: setup
	$(PY) benchmarks/bench_world.py $(BENCH_ARGS)

clean:
	rm -rf .cache demo_out artifacts
