# Two commands do all the set-up on a fresh machine:
#   make demo   the main job: remat bench on the built-in GPT (table on stdout, report in out/bench)
#   make test   lint and the test suite
# Both create .venv and install remat into it. torch is pinned to the CPU build on this machine's disk.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: demo test venv lint clean browser

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev,hf,plot,lightning,accelerate]" "$(TORCH_PIN)"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/remat env
	$(BIN)/remat bench gpt --steps 3 --budgets 80%,50%,min --out out/bench

lint: venv
	$(BIN)/ruff check src tests scripts benchmarks examples
	$(BIN)/ruff format --check src tests scripts benchmarks examples

test: venv lint browser
	$(BIN)/python -m pytest -q -x --durations=15

# Under CI (CI=true), Debian's chromium and chromium-driver for tests/integration/test_timeline_browser.py,
# installed when missing (with sudo when not root and sudo exists); elsewhere the test says why it skips.
browser:
	@if [ "$$CI" = true ] && ! command -v chromium >/dev/null; then \
		SUDO=; if [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi; \
		$$SUDO apt-get install -y -q chromium chromium-driver \
		|| { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; } \
		|| echo "make test: could not install chromium; the browser test fails under CI"; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
