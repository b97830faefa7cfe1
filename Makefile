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

.PHONY: setup run run-full test test-fast test-ranks test-slurm test-docker test-browser test-gpu gpu-wheels train-grok sweep-grok train-best train-hmm sweep-hmm sweep-crosscoder \
	report ui lint doctor constraints clean

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
	$(BIN)/python -m pytest -m "not ranks and not slurm and not docker and not browser" -n auto --dist worksteal

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

# What people look at, opened in a real headless browser (tests/browser.py): the HTML reports and mlflow ui.
# Debian's chromium and chromium-driver, installed when missing (root, apt); screenshots in test-results/.
test-browser: setup
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			chromium chromium-driver)
	$(BIN)/python -m pytest -m browser

# Every CUDA path on a real GPU, in under 8 minutes, set-up included (tests/gpu/run.sh): a venv over the CUDA torch
# already there (tests/gpu/setup.sh; the rest from .whl/ or the package index), the gpu-marked tests, then
# bench/gpu.py's figures, each beside its CPU one; results in $$OUT or test-results/gpu/. Without an NVIDIA GPU: one
# line, exit 0, nothing set up. Needs no `make setup`: the machine's own python3 holds torch.
test-gpu:
	@if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then bash tests/gpu/run.sh; \
	else echo "make test-gpu: no NVIDIA GPU here (nvidia-smi -L lists none): skipped, nothing set up"; fi

# The wheels test-gpu installs on a GPU machine that reaches no package index (tests/gpu/requirements.txt, for
# CPython 3.12 on x86-64) into .whl/, with their size against the 64 MiB such a machine takes with the tree.
gpu-wheels:
	bash tests/gpu/wheels.sh

train-grok: setup data
	dvc exp run -S grok.weight_decay=$(WD)

# The seed's wd sweep, with each output head in HEADS (HEADS="log2 seed": both, to compare them in one report).
sweep-grok: setup data
	for head in $(HEADS); do for wd in $(WDS); do \
		dvc exp run --queue -S grok.weight_decay=$$wd -S grok.output_head=$$head; done; done
	dvc queue start --jobs 1
	@echo "queued; follow with: dvc queue status, make ui; when done, compare them: labpipe report grok"

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
	@echo "queued; follow with: dvc queue status, dvc exp show, make ui; when done, compare them: labpipe report hmm"

# The seed's decoder-init sweep (0.08: the lab's reference) for each sparsity term (its "non-detach" runs): one
# queued experiment (and one MLflow run) per (crosscoder.decoder_norm_in_penalty, crosscoder.dec_init_norm); the
# buffer is harvested once (stage activations is unchanged across the sweep and restored from the DVC cache).
sweep-crosscoder: setup data
	for p in $(PENALTIES); do for n in $(NORMS); do \
		dvc exp run --queue -S crosscoder.decoder_norm_in_penalty=$$p -S crosscoder.dec_init_norm=$$n; done; done
	dvc queue start --jobs 1
	@echo "queued; follow with: dvc queue status; when done, compare them: labpipe report crosscoder"

# A line's runs compared (LINE: grok, hmm, lm, crosscoder, dormancy), from the MLflow store: reports/$(LINE)/
# report.md and report.html. ARGS narrows the runs, e.g. ARGS="--dvc-exp NAME" or ARGS="--tag labpipe.job_id=ID".
LINE ?= grok
ARGS ?=
report: setup
	labpipe report $(LINE) $(ARGS)

# MLflow 3's UI opens every experiment on its GenAI overview unless told the workflow: this URL shows the runs.
ui: setup
	@echo "the training runs: http://127.0.0.1:$(PORT)/#/experiments?workflowType=machine_learning"
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
