# The two commands a newcomer needs:
#   make demo   - builds everything into .venv and runs the main job on the embedded default
#                 (tiny random model, ONNX Runtime CPU)
#   make test   - builds everything into .venv, lints, and runs the test suite
# Everything is installed by these targets; nothing has to be installed by hand first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch (the export stage only). On machines that keep a local wheel of it, pip picks it up.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.legion-installed

.PHONY: demo test lint install clean bench

demo: $(STAMP)
	$(VENV)/bin/legion-rt demo

test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check legion_rt export tests benchmarks
	$(VENV)/bin/ruff format --check legion_rt export tests benchmarks
	$(VENV)/bin/clang-format --dry-run --Werror kernels/*.h kernels/*.cpp kernels/*.cu kernels/*.cuh

install: $(STAMP)

# The editable install maps the package's Python files when it is made: when files are added, moved or removed
# (not just edited), it must be made again. The list of files is a prerequisite whose time changes only when the
# list does.
FILES  := $(VENV)/.legion-files
$(shell mkdir -p $(VENV) && find legion_rt export -name '*.py' -o -name '*.json' | sort > $(FILES).new && \
  (cmp -s $(FILES).new $(FILES) || mv $(FILES).new $(FILES)); rm -f $(FILES).new)

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard kernels/*) $(FILES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[cpu,export,test,serve,ray]"
	touch $(STAMP)

bench: $(STAMP)
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/e2e.py
	$(PY) benchmarks/classify.py
	$(PY) benchmarks/watch.py

# build/ holds every build output (CMake's files, the compiled _C); the rest are leftovers of the former
# in-place editable builds, which ran CMake in the repository root.
clean:
	rm -rf build $(VENV) legion_rt/_C*.so
	rm -rf .cmake CMakeFiles CMakeCache.txt CMakeInit.txt build.ninja cmake_install.cmake compile_commands.json \
		.ninja_deps .ninja_lock .ninja_log .skbuild-info.json
