# megedit pipeline. Each stage is a file target: its manifest.json, written last and atomically,
# so `make all` re-runs only what is missing or older than its inputs.
#
#   make all MODEL=smollm2 DATASET=counterfact N=1024
#   make prepare encoder familiarity collect diffusion evaluate   (any subset, same variables)
#   make test            install everything from scratch and run the test suite
#   make tensorboard     watch every run's training curves

MODEL   ?= smollm2
DATASET ?= counterfact
N       ?= 256
SEED    ?= 0
RUNS    ?= runs
# Extra LightningCLI flags per stage, e.g. COLLECT_ARGS="--trainer.devices 2 --trainer.strategy ddp"
PREPARE_ARGS     ?=
ENCODER_ARGS     ?=
FAMILIARITY_ARGS ?=
COLLECT_ARGS     ?=
DIFFUSION_ARGS   ?=
EVALUATE_ARGS    ?=
# `make all` scores MeG and its variants; `make peers` (or PEERS=yes on `all`/`evaluate`) also edits with the
# peers FT, MEMIT and AlphaEdit on the same edits and metric (runs of at most 1024 edits; on a CPU they cost more
# than the whole MeG pipeline: MEMIT's target values alone take ~5 s per edit on SmolLM2).
PEERS   ?= no
PEERS_FLAG = $(if $(filter no,$(PEERS)),--model.peer_max_edits 0)  # kept out of EVALUATE_ARGS: a command-line value replaces it

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.megedit-installed

.PHONY: all install test test-fast prepare encoder familiarity collect diffusion evaluate peers tensorboard clean-run report sweep-threshold sweep-steps
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
# EXP=<name> runs an ablation from configs/experiments/<name>/<stage>.yaml into $(BASE)-<name>.
# A stage without an experiment config, whose inputs are shared too, is linked from the base run
# instead of recomputed (e.g. EXP=mlp-generator retrains only the generator and re-evaluates).
BASE    := $(RUNS)/$(MODEL)-$(DATASET)-$(N)
RUN     ?= $(BASE)$(if $(EXP),-$(EXP))
EXPDIR  := configs/experiments/$(EXP)
exp_cfg  = $(if $(EXP),$(wildcard $(EXPDIR)/$(1).yaml))
TB       = --trainer.logger.init_args.save_dir $(RUN)/tb
CFG      = $(if $(call exp_cfg,$(1)),--config $(call exp_cfg,$(1)))
# A dataset may tune a stage: configs/stages/<stage>-<dataset>.yaml is read over the stage's defaults.
DATASET_CFG = $(if $(wildcard configs/stages/$(1)-$(DATASET).yaml),--config configs/stages/$(1)-$(DATASET).yaml)

# The stage graph (DEPS_*, IN_* input flags, own_*: does EXP recompute the stage, TB_*), generated from
# src/megedit/graph.py by `megedit plan`.
include stages/plan.mk
CMD = stages/$(1).py $(IN_$(1)) --model.out_dir $(RUN)/$(1) $(TB_$(1)) $(call DATASET_CFG,$(1)) $(call CFG,$(1)) \
      $(if $(filter evaluate,$(1)),$(PEERS_FLAG)) $(ARGS_$(1))

define STAGE_RULE
$(1): $(RUN)/$(1)/manifest.json
$(RUN)/$(1)/manifest.json: $(foreach d,$(DEPS_$(1)),$(RUN)/$(d)/manifest.json) | $(STAMP)
ifeq ($(if $(EXP),$(own_$(1)),yes),)
	$$(MAKE) --no-print-directory $(BASE)/$(1)/manifest.json EXP= RUN=$(BASE)
	mkdir -p $(RUN) && ln -sfn $(abspath $(BASE)/$(1)) $(RUN)/$(1)
else
	$(PY) $(call CMD,$(1))
endif
endef
$(foreach s,$(STAGES),$(eval $(call STAGE_RULE,$(s))))

all: evaluate

# MeG beside the peers (FT, MEMIT, AlphaEdit) in one table, $(RUN)/evaluate-peers/. The peers' edited weights
# are kept there and MEMIT's target values in the cache, so a rerun re-edits only what is missing.
# PEERS_ARGS go to the evaluate stage.
PEERS_ARGS ?=
peers: $(RUN)/evaluate/manifest.json
	$(PY) stages/evaluate.py --data.run_dir $(RUN) --model.out_dir $(RUN)/evaluate-peers $(TB) \
	  $(call DATASET_CFG,evaluate) $(call CFG,evaluate) $(PEERS_ARGS)

# Table 16: evaluate one run at several entropy thresholds (no retraining).
THRESHOLDS ?= 0.05 0.1 0.2 0.3 0.5
sweep-threshold: $(RUN)/evaluate/manifest.json
	for t in $(THRESHOLDS); do \
	  $(PY) stages/evaluate.py --data.run_dir $(RUN) --model.variants '[meg]' \
	    --model.router_threshold $$t --model.out_dir $(RUN)/evaluate-threshold-$$t $(TB) $(SWEEP_ARGS) || exit 1; done
	$(PY) -m megedit.cli report $(RUN)/evaluate $(foreach t,$(THRESHOLDS),$(RUN)/evaluate-threshold-$(t)) \
	  --out $(RUN)/threshold-sweep

# Table 8: evaluate one run with several DDIM step counts (no retraining). SWEEP_ARGS go to each evaluate, e.g.
# SWEEP_ARGS="--data.limit 256" scores the first 256 edits only (the sweeps compare on the same edits).
STEPS ?= 10 50 100 1000
SWEEP_ARGS ?=
sweep-steps: $(RUN)/evaluate/manifest.json
	for s in $(STEPS); do \
	  $(PY) stages/evaluate.py --data.run_dir $(RUN) --model.variants '[meg]' --model.steps $$s \
	    --model.out_dir $(RUN)/evaluate-steps-$$s $(TB) $(SWEEP_ARGS) || exit 1; done
	$(PY) -m megedit.cli report $(foreach s,$(STEPS),$(RUN)/evaluate-steps-$(s)) --out $(RUN)/steps-sweep

# General ability before/after editing (the paper's Table 3; docs/general.md): the base LM and the run's variants
# on BBH, GSM8K, MMLU, RTE and SST-2. Always runs: the stage keeps every scored item, so a rerun scores only what
# is new. GENERAL_ARGS="--model.variants [base,meg,ft,memit,alphaedit]" adds the peers; GENERAL_ALL=1 scores
# every item instead of a seeded 200 per benchmark.
GENERAL_ARGS ?=
GENERAL_ALL  ?=
.PHONY: general
general: | $(STAMP) $(foreach d,prepare encoder familiarity diffusion,$(RUN)/$(d)/manifest.json)
	$(PY) stages/general.py --data.run_dir $(RUN) --model.out_dir $(RUN)/general \
	  $(if $(GENERAL_ALL),--data.items_per_benchmark null) $(GENERAL_ARGS)

# One table and a scaling plot over every finished run (or REPORT_RUNS="dir1 dir2").
REPORT_RUNS ?= $(wildcard $(RUNS)/*/evaluate $(RUNS)/*/evaluate-peers)
report: | $(STAMP)
	$(PY) -m megedit.cli report $(REPORT_RUNS) --out $(RUNS)/report

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir $(RUNS)

clean-run:
	rm -rf $(RUN)
