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

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.megedit-installed

.PHONY: all install test test-fast prepare encoder familiarity collect diffusion evaluate tensorboard clean-run report sweep-threshold
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
own_prepare     = $(call exp_cfg,prepare)
own_encoder     = $(or $(call exp_cfg,encoder),$(own_prepare))
own_familiarity = $(or $(call exp_cfg,familiarity),$(own_encoder))
own_collect     = $(or $(call exp_cfg,collect),$(own_prepare))
own_diffusion   = $(or $(call exp_cfg,diffusion),$(own_encoder),$(own_collect))
own_evaluate    = yes
TB       = --trainer.logger.init_args.save_dir $(RUN)/tb
CFG      = $(if $(call exp_cfg,$(1)),--config $(call exp_cfg,$(1)))

CMD_prepare     = stages/prepare.py --data.model $(MODEL) --data.dataset $(DATASET) --data.n_edits $(N) \
                  --data.seed $(SEED) --model.out_dir $(RUN)/prepare $(call CFG,prepare) $(PREPARE_ARGS)
CMD_encoder     = stages/encoder.py --data.prepare_dir $(RUN)/prepare --model.out_dir $(RUN)/encoder $(TB) \
                  $(call CFG,encoder) $(ENCODER_ARGS)
CMD_familiarity = stages/familiarity.py --data.prepare_dir $(RUN)/prepare --data.encoder_dir $(RUN)/encoder \
                  --model.out_dir $(RUN)/familiarity $(TB) $(call CFG,familiarity) $(FAMILIARITY_ARGS)
# A dataset may tune a stage: configs/stages/<stage>-<dataset>.yaml is read over the stage's defaults.
DATASET_CFG = $(if $(wildcard configs/stages/$(1)-$(DATASET).yaml),--config configs/stages/$(1)-$(DATASET).yaml)
CMD_collect     = stages/collect.py --data.prepare_dir $(RUN)/prepare --model.out_dir $(RUN)/collect \
                  $(call DATASET_CFG,collect) $(call CFG,collect) $(COLLECT_ARGS)
CMD_diffusion   = stages/diffusion.py --data.prepare_dir $(RUN)/prepare --data.encoder_dir $(RUN)/encoder \
                  --data.collect_dir $(RUN)/collect --model.out_dir $(RUN)/diffusion $(TB) \
                  $(call CFG,diffusion) $(DIFFUSION_ARGS)
CMD_evaluate    = stages/evaluate.py --data.run_dir $(RUN) \
                  --model.out_dir $(RUN)/evaluate $(TB) $(call CFG,evaluate) $(EVALUATE_ARGS)

DEPS_prepare     =
DEPS_encoder     = prepare
DEPS_familiarity = prepare encoder
DEPS_collect     = prepare
DEPS_diffusion   = prepare encoder collect
DEPS_evaluate    = prepare encoder familiarity collect diffusion

define STAGE_RULE
$(1): $(RUN)/$(1)/manifest.json
$(RUN)/$(1)/manifest.json: $(foreach d,$(DEPS_$(1)),$(RUN)/$(d)/manifest.json) | $(STAMP)
ifeq ($(if $(EXP),$(own_$(1)),yes),)
	$$(MAKE) --no-print-directory $(BASE)/$(1)/manifest.json EXP= RUN=$(BASE)
	mkdir -p $(RUN) && ln -sfn $(abspath $(BASE)/$(1)) $(RUN)/$(1)
else
	$(PY) $(CMD_$(1))
endif
endef
$(foreach s,prepare encoder familiarity collect diffusion evaluate,$(eval $(call STAGE_RULE,$(s))))

all: evaluate

# Table 16: evaluate one run at several entropy thresholds (no retraining).
THRESHOLDS ?= 0.05 0.1 0.2 0.3 0.5
sweep-threshold: $(RUN)/evaluate/manifest.json
	for t in $(THRESHOLDS); do \
	  $(PY) stages/evaluate.py --data.run_dir $(RUN) --model.variants '[meg]' \
	    --model.router_threshold $$t --model.out_dir $(RUN)/evaluate-threshold-$$t $(TB) || exit 1; done
	$(PY) -m megedit.cli report $(RUN)/evaluate $(foreach t,$(THRESHOLDS),$(RUN)/evaluate-threshold-$(t)) \
	  --out $(RUN)/threshold-sweep

# One table and a scaling plot over every finished run (or REPORT_RUNS="dir1 dir2").
REPORT_RUNS ?= $(wildcard $(RUNS)/*/evaluate)
report: | $(STAMP)
	$(PY) -m megedit.cli report $(REPORT_RUNS) --out $(RUNS)/report

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir $(RUNS)

clean-run:
	rm -rf $(RUN)
