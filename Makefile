# Two commands do all the set-up (README): `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install profile clean-artifacts

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The stages run `python -m stages.NAME`: put the venv first on PATH so that python is this one.
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@$(BIN)/python -m pipeline.where

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Select a configuration profile: make profile NAME=paper-syntic-coco (NAME=offline switches back).
profile: $(STAMP)
	$(BIN)/python -m pipeline.params use $(NAME)
