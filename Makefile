# Two commands: `make demo` and `make test`. Both run `setup` first, which is idempotent.
# `make demo DEMO=speech`: the same method on speech in machine noise; DEMO_ARGS="--quick" for a short run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pahubert-setup
PIP := $(BIN)/pip --disable-pip-version-check
TORCH_PINS := torch==2.11.0 torchaudio==2.11.0
BUILD_PINS := pip==25.3 setuptools==80.9.0 wheel==0.45.1 cython==3.1.4 numpy==2.2.6
PYTEST_ARGS ?=
# tests run in TEST_JOBS processes (pytest-xdist), one test file per process at a time: a file's module
# fixtures (a trained model, a rendered corpus) are built once. TEST_JOBS=0 runs them in this process.
TEST_JOBS ?= 2
XDIST = $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder)

.PHONY: setup test test-quick demo bench clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	@command -v ffmpeg >/dev/null || { echo "[setup] installing Debian ffmpeg (musdb/stempeg need it)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq ffmpeg; }
	@{ command -v fluidsynth >/dev/null && test -f /usr/share/sounds/sf2/TimGM6mb.sf2 \
	  && test -f /usr/share/sounds/sf3/MuseScore_General_Lite.sf3; } || { \
	  echo "[setup] installing Debian fluidsynth + GM soundfonts (pahubert-midi-corpus needs them)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    fluidsynth musescore-general-soundfont-small timgm6mb-soundfont; }
	@{ command -v flite >/dev/null && command -v espeak-ng >/dev/null && test -d /usr/share/asterisk/sounds/en \
	  && test -d /usr/share/asterisk/sounds/es && test -d /usr/share/games/openttd/baseset/opensfx; } || { \
	  echo "[setup] installing Debian speech prompts, voices and machine sounds (pahubert-speech-corpus needs them)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    flite espeak-ng asterisk-core-sounds-en-g722 asterisk-core-sounds-es-g722 openttd-opensfx; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(BUILD_PINS)
	$(PIP) install -q $(TORCH_PINS)
	@# fairseq-fixed builds C++/Cython extensions against the torch above (~6 min the first time)
	$(BIN)/python -c "import fairseq" 2>/dev/null || $(PIP) install --no-build-isolation fairseq-fixed==0.12.3.1
	$(PIP) install -q --no-build-isolation -e '.[test,bench]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q $(XDIST) $(PYTEST_ARGS) tests

test-quick: setup
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS) tests

demo: setup
	PATH=$(abspath $(BIN)):$$PATH bash examples/demo/run.sh $(if $(DEMO),--corpus $(DEMO)) $(DEMO_ARGS)

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b; done

clean:
	rm -rf exp results data/toy .pytest_cache
