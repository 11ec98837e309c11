# Two commands do everything on a fresh machine:  make demo   and   make test
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup setup-compat test test-unit test-compat demo bench bench-world clean

# Another ComfyUI checkout (make test-compat / make bench COMFYUI=/path/to/ComfyUI): its own venv in
# .cache/compat/ (tools/provision_compat.sh); tests, benchmarks and the server use it through
# SAFEGEN_COMFYUI and SAFEGEN_PYTHON.
ifneq ($(strip $(COMFYUI)),)
COMPAT_DIR := $(abspath $(COMFYUI))
COMPAT_PY := $(shell bash tools/provision_compat.sh --print-python "$(COMPAT_DIR)" 2>/dev/null)
COMPAT_ENV := SAFEGEN_COMFYUI="$(COMPAT_DIR)" SAFEGEN_PYTHON="$(COMPAT_PY)"
endif

setup:
	@bash tools/provision.sh
	@bash tools/provision_browser.sh

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

setup-compat:
	@test -n "$(COMFYUI)" || { echo "usage: make $(or $(MAKECMDGOALS),setup-compat) COMFYUI=/path/to/ComfyUI" >&2; exit 2; }
	@bash tools/provision_compat.sh "$(COMPAT_DIR)"
	@bash tools/provision_browser.sh

# the same pytest command as `make test`, in the checkout's venv, against that checkout
test-compat: setup-compat
	export $(COMPAT_ENV) && "$(COMPAT_PY)" -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)") $(if $(UNLEARNED),--unlearned "$(UNLEARNED)") $(if $(OUT),--out "$(OUT)") $(if $(TRAIN_STEPS),--train-steps $(TRAIN_STEPS))

bench: $(if $(strip $(COMFYUI)),setup-compat,setup)
	$(if $(strip $(COMFYUI)),export $(COMPAT_ENV) && "$(COMPAT_PY)",$(PY)) benchmarks/run_all.py

# Every defence in the miniature world through a real server (issue 8); BENCH_ARGS e.g. --retrain
bench-world: setup
	$(PY) benchmarks/bench_world.py $(BENCH_ARGS)

clean:
	rm -rf .cache demo_out artifacts
