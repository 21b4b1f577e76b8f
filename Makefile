# Two commands do all the set-up (README): `make demo` and `make test`. Both install the exact,
# hash-checked versions of a lock file in requirements/ (README, "Environment"); `make lock`
# regenerates the lock files from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Which lock make installs: test (FAISS for CPU + the test tools: make demo, make test, CI), gpu
# (FAISS for CUDA + the test tools), base (FAISS for CPU, no test tools) or ray (base + Ray's extras).
LOCK   ?= test
LOCKED := $(VENV)/.locked-$(LOCK)
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install profile clean-artifacts lock test-latest bench

# A lock change, or another LOCK, rebuilds the venv from nothing, so that it holds the lock's
# packages and no leftovers. The locked pip comes first; the lock then installs in hash-checking
# mode, which also refuses any dependency that the lock does not pin.
$(LOCKED): requirements/$(LOCK).txt requirements/pip.txt
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/pip.txt
	$(BIN)/pip install --quiet --require-hashes -r requirements/$(LOCK).txt
	touch $@

# The project itself, editable: --no-deps resolves nothing beyond the lock, --no-build-isolation
# builds it with the locked setuptools instead of fetching one.
$(STAMP): $(LOCKED) pyproject.toml
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

# The stages run `python -m stages.NAME`: put the venv first on PATH so that python is this one.
# `synthcap speed` times a fixed CPU workload before and after (pipeline/machine_speed.py): `synthcap status`
# gives the stage times in units of it, since wall time on a shared machine drifts.
demo: $(STAMP)
	$(BIN)/synthcap speed --when before
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/synthcap speed --when after
	@$(BIN)/synthcap status

# Two pytest-xdist workers, one per core (TEST_WORKERS=0: one process). --dist loadgroup keeps each long
# end-to-end build on one worker; tests/conftest.py orders the suite so that both stay busy.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST)

# The developer's loop (README, "Tests"): every test but the end-to-end `dvc repro` runs, the Ray
# cluster and the other slow ones (pyproject.toml, markers); about 3 minutes on 2 cores. make test
# (and CI, .ci/run) still runs all of them.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not e2e and not cluster and not slow"

# Every benchmark, one table, and artifacts/bench/results.json (bench/run.py; README, "Scale"):
# make bench DEVICE=cuda on a GPU; make bench QUICK=1 for a smoke test of the benchmarks (no figures).
DEVICE    ?= cpu
BENCH_OUT ?= artifacts/bench/results.json
bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.run --device $(DEVICE) --out $(BENCH_OUT) $(if $(QUICK),--quick)

# Select a configuration profile: make profile NAME=paper-syntic-coco (NAME=world switches back to the demo's).
profile: $(STAMP)
	$(BIN)/python -m pipeline.profiles use $(NAME)

# --- Lock files --------------------------------------------------------------------------------
# make lock                          re-resolve after a pyproject.toml change, keeping every pin
#                                    that still fits (so it is repeatable: a second run changes nothing)
# make lock UPGRADE=all              move every pin to the newest release that fits
# make lock UPGRADE="numpy pillow"   move only these
# make lock TORCH_INDEX=https://download.pytorch.org/whl/cpu
#                                    take torch and torchvision from PyTorch's index (here: CPU-only
#                                    builds; .../whl/cu126 etc. for another CUDA). The index URL is
#                                    written into the lock files, so installs find the chosen wheels.
#                                    Back to PyPI's build: make lock UPGRADE="torch torchvision"
# pip-tools runs from its own small venv (.venv/pip-tools): locking installs neither the project nor a lock.
PIP_TOOLS   ?= pip-tools==7.6.2
TOOLS       := $(VENV)/pip-tools
TORCH_INDEX ?=
UPGRADE     ?=
# A constraint file configured for pip on this machine (pip config, PIP_CONSTRAINT) also bounds the
# lock: otherwise the lock could pin a release (say a newer torch) that this pip refuses to install.
PIP_CONSTRAINTS = $(sort $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[a-z:.]*\.constraint='\(.*\)'$$/\1/p"))

PIP_COMPILE = $(TOOLS)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-find-links $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) -P torch -P torchvision,--no-emit-index-url) \
	$(addprefix --constraint ,$(PIP_CONSTRAINTS)) \
	$(if $(filter all,$(UPGRADE)),--upgrade,$(addprefix -P ,$(UPGRADE)))
# $(call compile,NAME,WHAT,SOURCES): requirements/NAME.txt from SOURCES; WHAT goes in its header.
# pip-compile seeds its pins from the file it writes: a copy, replacing the lock only if it differs
# (an unchanged lock keeps its time stamp, so make does not rebuild .venv for nothing).
comma := ,
compile = new=requirements/.$(1).txt.new; cp requirements/$(1).txt $$new 2>/dev/null; \
	CUSTOM_COMPILE_COMMAND="make lock  (this file: $(2))" $(PIP_COMPILE) -o $$new $(3) || { rm -f $$new; exit 1; }; \
	if cmp -s $$new requirements/$(1).txt; then rm $$new; else mv $$new requirements/$(1).txt; echo "requirements/$(1).txt: updated"; fi

$(TOOLS)/bin/pip-compile:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --require-hashes -r requirements/pip.txt
	$(TOOLS)/bin/pip install --quiet "$(PIP_TOOLS)"

lock: $(TOOLS)/bin/pip-compile
	$(call compile,pip,requirements/pip.in,requirements/pip.in)
	$(call compile,base,synthcap[cpu] from pyproject.toml,--extra cpu pyproject.toml)
	$(call compile,test,synthcap[cpu$(comma)test] from pyproject.toml,--extra cpu --extra test pyproject.toml)
	$(call compile,ray,synthcap[cpu$(comma)ray] from pyproject.toml,--extra cpu --extra ray pyproject.toml)
	$(call compile,gpu,synthcap[gpu$(comma)test] from pyproject.toml,--extra gpu --extra test pyproject.toml)

# The suite against the newest releases that pyproject.toml allows, in a venv of its own (not CI's):
# drift (a deprecation turned error, a broken release) shows here before a lock upgrade meets it.
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/pip install --quiet --upgrade --upgrade-strategy eager -e ".[cpu,test]"
	.venv-latest/bin/python -m pytest -q
