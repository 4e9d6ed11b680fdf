# The README's commands. Each target sets up what it needs: the virtual environment, the pinned
# dependencies (requirements.txt) and the native extension (setup.py -> CMake -> csrc/).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed

.PHONY: demo test bench build setup info clean

demo: build  ## the main job: train XMC-GAN on the embedded shapes dataset (runs/shapes)
	$(PY) -m fastxmc.train $(ARGS)

test: build  ## the whole suite; Triton kernels run in the interpreter on CPU tensors
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: build  ## the kernel microbenchmarks (results appended under benchmarks/results/)
	$(PY) -m benchmarks.bench_infonce --plot
	$(PY) -m benchmarks.bench_infonce --labels --plot
	$(PY) -m benchmarks.bench_region_word
	$(PY) -m benchmarks.bench_modulation
	$(PY) -m benchmarks.bench_word_attention
	$(PY) -m benchmarks.bench_train_step

info: build
	$(PY) -m fastxmc.info

build: $(DEPS)  ## incremental: CMake rebuilds only what changed
	$(PY) setup.py -q build_ext --inplace

setup: $(DEPS)

$(DEPS): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

clean:
	rm -rf build fastxmc/_C.so
