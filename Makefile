# megedit pipeline. Each stage is a file target: its manifest.json, written last and atomically,
# so `make all` re-runs only what is missing or older than its inputs.
#
#   make all MODEL=smollm2 DATASET=counterfact N=1024
#   make prepare encoder familiarity collect diffusion evaluate   (any subset, same variables)
#   make test            install everything from scratch and run the test suite
#   make tensorboard     watch every run's training curves

MODEL   ?= smollm2
DATASET ?= counterfact
N       ?= 1024
SEED    ?= 0
RUNS    ?= runs
RUN     ?= $(RUNS)/$(MODEL)-$(DATASET)-$(N)
# Extra LightningCLI flags per stage, e.g. COLLECT_ARGS="--trainer.devices 2 --trainer.strategy ddp"
PREPARE_ARGS     ?=
ENCODER_ARGS     ?=
FAMILIARITY_ARGS ?=
COLLECT_ARGS     ?=
DIFFUSION_ARGS   ?=
EVALUATE_ARGS    ?=

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.megedit-installed
TB      := --trainer.logger.init_args.save_dir $(RUN)/tb

.PHONY: all install test test-fast prepare encoder familiarity collect diffusion evaluate tensorboard clean-run
.DELETE_ON_ERROR:

# ---------------------------------------------------------------- install
$(STAMP): pyproject.toml .ci/install.sh
	bash .ci/install.sh $(VENV)
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# ---------------------------------------------------------------- stages
prepare: $(RUN)/prepare/manifest.json
$(RUN)/prepare/manifest.json: | $(STAMP)
	$(PY) stages/prepare.py --data.model $(MODEL) --data.dataset $(DATASET) --data.n_edits $(N) \
	  --data.seed $(SEED) --model.out_dir $(RUN)/prepare $(PREPARE_ARGS)

encoder: $(RUN)/encoder/manifest.json
$(RUN)/encoder/manifest.json: $(RUN)/prepare/manifest.json
	$(PY) stages/encoder.py --data.prepare_dir $(RUN)/prepare --model.out_dir $(RUN)/encoder $(TB) $(ENCODER_ARGS)

familiarity: $(RUN)/familiarity/manifest.json
$(RUN)/familiarity/manifest.json: $(RUN)/prepare/manifest.json $(RUN)/encoder/manifest.json
	$(PY) stages/familiarity.py --data.prepare_dir $(RUN)/prepare --data.encoder_dir $(RUN)/encoder \
	  --model.out_dir $(RUN)/familiarity $(TB) $(FAMILIARITY_ARGS)

collect: $(RUN)/collect/manifest.json
$(RUN)/collect/manifest.json: $(RUN)/prepare/manifest.json
	$(PY) stages/collect.py --data.prepare_dir $(RUN)/prepare --model.out_dir $(RUN)/collect $(COLLECT_ARGS)

diffusion: $(RUN)/diffusion/manifest.json
$(RUN)/diffusion/manifest.json: $(RUN)/prepare/manifest.json $(RUN)/encoder/manifest.json $(RUN)/collect/manifest.json
	$(PY) stages/diffusion.py --data.prepare_dir $(RUN)/prepare --data.encoder_dir $(RUN)/encoder \
	  --data.collect_dir $(RUN)/collect --model.out_dir $(RUN)/diffusion $(TB) $(DIFFUSION_ARGS)

evaluate: $(RUN)/evaluate/manifest.json
$(RUN)/evaluate/manifest.json: $(RUN)/prepare/manifest.json $(RUN)/encoder/manifest.json \
                               $(RUN)/familiarity/manifest.json $(RUN)/diffusion/manifest.json
	$(PY) stages/evaluate.py --data.prepare_dir $(RUN)/prepare --data.run_dir $(RUN) \
	  --model.out_dir $(RUN)/evaluate $(TB) $(EVALUATE_ARGS)

all: evaluate

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir $(RUNS)

clean-run:
	rm -rf $(RUN)
