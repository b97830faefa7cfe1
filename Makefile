# labpipe verbs. `make run` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build on disk; TORCH= (empty) skips it, TORCH='torch==2.13.0+cu126 --index-url ...' picks another.
TORCH  ?= torch==2.13.0
WD     ?= 0.01
WDS    ?= 0.01 0.03 0.1
HEADS  ?= log2
H      ?= 64
K      ?= 100
HS     ?= 16 32 64
KS     ?= 100 200
PORT   ?= 5000
NORMS  ?= 0.03 0.08 0.1 0.12 0.14 0.16 0.18 1
PENALTIES ?= none detached full

# Every stage and every queued DVC experiment (which runs in a temp copy) logs to this project's store.
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run run-full test test-fast test-ranks test-slurm test-docker train-grok sweep-grok grok-report train-best train-hmm sweep-hmm sweep-crosscoder \
	sweep-crosscoder-plot ui lint doctor constraints clean

setup: $(VENV)/.installed

# Reinstalls only when pyproject.toml changes: a second `make setup` is instant.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(strip $(TORCH)),$(BIN)/pip install -q $(TORCH))
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

data:
	mkdir -p data  # data.dvc tracks it; empty unless you bring raw inputs (see README)

run: setup data
	dvc repro

run-full: setup data
	dvc exp run $$(labpipe profile params.full.yaml)

# One pytest worker per core (pytest-xdist): most of the suite's time is subprocesses importing torch and MLflow.
test: setup
	$(BIN)/python -m pytest -m "not ranks and not slurm and not docker" -n auto --dist worksteal

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not ranks and not slurm and not docker" -n auto --dist worksteal

# lm_train as several processes, data-parallel (torchrun and labpipe's launcher, gloo): each run is 2 ranks, so
# one run at a time.
test-ranks: setup
	$(BIN)/python -m pytest -m ranks

# labpipe jobs on a real single-node Slurm cluster that the tests start on this machine (tests/slurm_cluster.py):
# Debian's slurm-wlm and munge, installed when missing (root, apt).
test-slurm: setup
	command -v slurmctld >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge)
	$(BIN)/python -m pytest -m slurm

# The images built (on stand-in bases) and the compose stack run, on a Docker engine the tests start on this
# machine (tests/docker_engine.py): Debian's docker.io and debootstrap, installed when missing (root, apt).
test-docker: setup
	command -v dockerd >/dev/null && command -v debootstrap >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap)
	$(BIN)/python -m pytest -m docker -s

train-grok: setup data
	dvc exp run -S grok.weight_decay=$(WD)

# The seed's wd sweep, with each output head in HEADS (HEADS="log2 seed": both, to compare them in one report).
sweep-grok: setup data
	for head in $(HEADS); do for wd in $(WDS); do \
		dvc exp run --queue -S grok.weight_decay=$$wd -S grok.output_head=$$head; done; done
	dvc queue start --jobs 1
	@echo "queued; follow with: dvc queue status, make ui; when done: make grok-report"

grok-report: setup
	labpipe grok-report

# The seed's best model (params.best.yaml): 6 ResNet experts (64 x 5) pretrained alone, each a tracked run,
# then a top-2 MoE gated on (n, k) fine-tuned from them as a DVC experiment. Each expert run moves the previous
# one's checkpoints aside (labpipe checkpoints --prune); EPOCHS is each expert's length (the fine-tune's is in
# the profile).
EPOCHS ?= 60
train-best: setup data
	dvc repro mheight_subsample
	mkdir -p artifacts/grok-experts
	for seed in 0 1 2 3 4 5; do \
		labpipe grok-train --set grok.model=resnet --set grok.width=64 --set grok.blocks=5 --set grok.seed=$$seed \
			--set grok.epochs=$(EPOCHS) \
		&& cp artifacts/grok/model.pt artifacts/grok-experts/expert_$$seed.pt || exit 1; done
	dvc exp run $$(labpipe profile params.best.yaml)

train-hmm: setup data
	dvc exp run -S hmm.hidden_states=$(H) -S hmm.vocab_size=$(K)

# One queued experiment (and one MLflow run) per (H, K); K must be one of text.vocab_sizes. With BATCHES, HS and
# BATCHES pair up instead (zip, the seed's NUM_STATES and BATCH_SIZES arrays), for each K:
#   make sweep-hmm HS="100 200 300 400 500 600" BATCHES="1024 256 256 256 128 128"
# (other paired lists: labpipe jobs submit hmm_train --zip KEY=V1,V2,... --zip KEY2=W1,W2,...)
BATCHES ?=
ifneq ($(and $(filter sweep-hmm,$(MAKECMDGOALS)),$(BATCHES)),)
ifneq ($(words $(HS)),$(words $(BATCHES)))
$(error sweep-hmm: HS has $(words $(HS)) values and BATCHES $(words $(BATCHES)): paired lists must be equally long)
endif
endif
sweep-hmm: setup data
	for k in $(KS); do for pair in $(if $(BATCHES),$(join $(HS),$(addprefix :,$(BATCHES))),$(HS)); do \
		dvc exp run --queue -S hmm.vocab_size=$$k -S hmm.hidden_states=$${pair%%:*} \
			$(if $(BATCHES),-S hmm.batch_size=$${pair#*:}); done; done
	dvc queue start --jobs 1
	@echo "queued; follow with: dvc queue status, dvc exp show, make ui"

# The seed's decoder-init sweep (0.08: the lab's reference) for each sparsity term (its "non-detach" runs): one
# queued experiment (and one MLflow run) per (crosscoder.decoder_norm_in_penalty, crosscoder.dec_init_norm); the
# buffer is harvested once (stage activations is unchanged across the sweep and restored from the DVC cache).
sweep-crosscoder: setup data
	for p in $(PENALTIES); do for n in $(NORMS); do \
		dvc exp run --queue -S crosscoder.decoder_norm_in_penalty=$$p -S crosscoder.dec_init_norm=$$n; done; done
	dvc queue start --jobs 1
	@echo "queued; follow with: dvc queue status; when done: make sweep-crosscoder-plot"

# Dead latents and explained variance vs dec_init_norm from the MLflow runs: artifacts/crosscoder/sweep/
sweep-crosscoder-plot: setup
	labpipe crosscoder-sweep-plot

ui: setup
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --port $(PORT)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/hadolint Dockerfile tests/docker/*.Dockerfile
	$(BIN)/shellcheck docker/*.sh tests/docker/*.sh
	$(BIN)/docker-compose config -q

doctor: setup
	$(BIN)/labpipe doctor

# The Docker image's lock, from this venv: run after a dependency change, then commit docker/constraints.txt.
constraints: setup
	docker/freeze-constraints.sh

clean:
	rm -rf artifacts mlruns mlflow.db wandb .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
