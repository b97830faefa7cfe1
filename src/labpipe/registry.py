"""The research lines of labpipe, declared in one place.

A line is an MLflow experiment, the params sections it owns, the short labels of its well-known knobs in run
names, and its stages: the verb a DVC stage runs, the function behind it, the sections it reads, and, for a
training stage, how the shared run lifecycle (labpipe.run) treats it: checkpoint unit and form, the run-length
param, the champion rule. The CLI's verb table, the Params composition (config.py) and doctor's stage map are
read from here. A new line is a package, one entry in LINES and its stages in dvc.yaml.

Nothing here imports a line's code: section classes and entry points are named as "module:attribute" and
resolved only when used, so reading the registry stays cheap.
"""

from __future__ import annotations

import dataclasses

# Params that never change what a training run computes, whichever line: not part of the resume fingerprint,
# so changing one (or the run length, `Training.length`) continues the same run.
NOT_TRAJECTORY = ("checkpoint_every", "keep_checkpoints", "val_every", "eval_every", "log_every", "num_workers",
                  "device")


@dataclasses.dataclass(frozen=True)
class Champion:
    """Register a training run's best model as `model` (placeholders like {hmm.vocab_size} filled from the
    params) and move its alias `champion` when `metric` of the final metrics beats the champion's."""

    model: str
    metric: str  # the value the run offers with its best weights (labpipe.run.Run.offer_best)
    lower_is_better: bool
    # (metric, low param, high param): a run is a candidate only when that final metric lies in the range
    band: tuple[str, str, str] | None = None
    # raised when the metric's definition changes: a champion registered under another revision measured
    # something else, so it is not compared with and the next candidate replaces it
    revision: int = 1


@dataclasses.dataclass(frozen=True)
class Training:
    """How labpipe.run drives a training stage."""

    section: str  # its params section; `<section>.init_from` starts it from given weights
    out_dir: str  # locked while it runs; checkpoints in out_dir/checkpoints
    unit: str  # "epoch" or "step": the checkpoint names and the MLflow step
    length: str  # the run-length param (in `section`)
    champion: Champion
    extendable: bool = True  # False when the schedule is built on the length: then it is in the fingerprint
    # save_pretrained directories (the weights are published for later stages) rather than .pt files
    directory_checkpoints: bool = False
    also_not_trajectory: tuple[str, ...] = ()  # more keys of `section` that do not change the trajectory
    # keys whose product is the rows of one step (the batch, the accumulation): the fingerprint holds that
    # product, so a run split otherwise over passes or ranks resumes as the same trajectory
    step_batch: tuple[str, ...] = ()
    # runs as several ranks (labpipe.distributed): `<section>.devices` ranks here, or one per Slurm task
    data_parallel: bool = False


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # the dvc.yaml stage
    verb: str  # labpipe <verb>
    entry: str  # "module:function", called with the Params
    help: str
    reads: tuple[str, ...]  # the params sections it reads
    training: Training | None = None

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]


@dataclasses.dataclass(frozen=True)
class Line:
    name: str
    experiment: str  # the MLflow experiment of every stage of the line
    sections: dict[str, str]  # params section -> "module:DataclassName"
    stages: tuple[Stage, ...]
    # param -> its label in MLflow run names (`hmm_train H=128 K=200`); "": the value alone (`moe`). Other
    # params that differ from params.yaml appear by their last segment (`lr=0.002`)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)


LINES = (
    Line("mheight", "mheight-grokking",
         {"mheight": "labpipe.config:MHeightParams", "grok": "labpipe.config:GrokParams"}, (
             Stage("mheight_data", "mheight-data", "labpipe.mheight.data:run_data",
                   "exact m-heights per (n,k,m) group (stage mheight_data)", ("mheight",)),
             Stage("mheight_subsample", "mheight-subsample", "labpipe.mheight.data:run_subsample",
                   "balanced train/val subsamples per group", ("mheight",)),
             Stage("grok_train", "grok-train", "labpipe.grok.train:run_train",
                   "train the m-height regressor with AdamW (stage grok_train)", ("grok",),
                   Training("grok", "artifacts/grok", "epoch", "epochs",
                            Champion("mheight-regressor", "val_loss", lower_is_better=True),
                            # when to stop and what is detected: the epochs run, not what each epoch does
                            also_not_trajectory=("grokking_window", "grokking_drop", "stop_after_plateau"))),
         ), {"grok.weight_decay": "wd", "grok.model": "", "grok.init_from": "from",
             "grok.init_experts_from": "experts"}),
    Line("icl", "in-context-language-learning",
         {"text": "labpipe.config:TextParams", "hmm": "labpipe.config:HMMParams",
          "synth": "labpipe.config:SynthParams", "lm": "labpipe.config:LMParams"}, (
             Stage("corpus", "corpus", "labpipe.text.stages:run_corpus",
                   "stories of the train and test splits as text (stage corpus)", ("text",)),
             Stage("tokenize", "tokenize", "labpipe.text.stages:run_tokenize",
                   "word-level top-K token files (stage tokenize)", ("text",)),
             Stage("hmm_train", "hmm-train", "labpipe.hmm.train:run_train",
                   "fit an HMM by minibatch EM (stage hmm_train)", ("hmm",),
                   Training("hmm", "artifacts/hmm", "epoch", "epochs",
                            Champion("hmm-K{hmm.vocab_size}", "heldout_ll_per_token", lower_is_better=False),
                            also_not_trajectory=("memory_budget_gb",))),
             Stage("hmm_eval", "hmm-eval", "labpipe.hmm.evaluate:run_eval",
                   "final-token CE and KL vs uniform/unigram/bigram (stage hmm_eval)", ("hmm",)),
             Stage("synth", "synth", "labpipe.synth.generate:run_synth",
                   "sample sharded synthetic token datasets from the HMM (stage synth)", ("synth",)),
             Stage("lm_train", "lm-train", "labpipe.lm.train:run_train",
                   "train a Llama LM on the synthetic shards (stage lm_train)", ("lm",),
                   Training("lm", "artifacts/lm", "step", "max_steps",
                            Champion("lm-synthetic", "val_loss", lower_is_better=True),
                            directory_checkpoints=True, also_not_trajectory=("devices", "collective_timeout_s"),
                            step_batch=("batch_size", "grad_accum_steps"), data_parallel=True)),
             Stage("lm_eval", "lm-eval", "labpipe.lm.evaluate:run_eval",
                   "in-context learning curve: LM vs HMM Bayes loss (stage lm_eval)", ("lm", "hmm")),
         ), {"hmm.hidden_states": "H", "hmm.vocab_size": "K", "hmm.seq_length": "L", "hmm.batch_size": "B",
             "hmm.update_freq": "uf", "hmm.train_unique": "unique", "lm.hidden_size": "d", "lm.layers": "layers",
             "lm.batch_size": "B", "lm.max_steps": "steps", "lm.init_from": "from"}),
    Line("dormancy", "dormant-neurons", {"dormancy": "labpipe.config:DormancyParams"}, (
        Stage("dormancy", "dormancy", "labpipe.dormancy.analysis:run_dormancy",
              "dormant neurons across checkpoints, appended to a CSV", ("dormancy",)),
    )),
    Line("crosscoder", "crosscoders", {"crosscoder": "labpipe.config:CrosscoderParams"}, (
        Stage("activations", "activations", "labpipe.crosscoder.buffer:run_activations",
              "harvest two sources' activations into a buffer", ("crosscoder",)),
        Stage("crosscoder_train", "crosscoder-train", "labpipe.crosscoder.train:run_train",
              "train a sparse crosscoder (stage crosscoder_train)", ("crosscoder",),
              Training("crosscoder", "artifacts/crosscoder", "step", "steps",
                       Champion("crosscoder", "mean_explained_variance", lower_is_better=False,
                                band=("l0", "crosscoder.champion_l0_min", "crosscoder.champion_l0_max"),
                                revision=2),  # 2: the seed's per-token mean; 1 was (EV_a + EV_b) / 2
                       extendable=False,  # lr decays to 0 at crosscoder.steps
                       also_not_trajectory=("eval_rows", "champion_l0_min", "champion_l0_max"))),
    ), {"crosscoder.dec_init_norm": "dec_init", "crosscoder.decoder_norm_in_penalty": "", "crosscoder.l1_coef": "l1",
        "crosscoder.dict_size": "F"}),
)

STAGES = {stage.name: stage for line in LINES for stage in line.stages}


def stage(name: str) -> Stage:
    """A stage by its dvc.yaml name or its verb; KeyError listing the stages otherwise."""
    for candidate in STAGES.values():
        if name in (candidate.name, candidate.verb):
            return candidate
    raise KeyError(f"unknown stage {name!r}: the stages are {', '.join(STAGES)}")


def line_of(stage_name: str) -> Line:
    """The research line that owns the DVC stage `stage_name`."""
    for line in LINES:
        if any(s.name == stage_name for s in line.stages):
            return line
    raise KeyError(f"no research line has a stage {stage_name!r}: the stages are {', '.join(STAGES)}")


def resolve(target: str):
    """The object named by "module:attribute"."""
    import importlib

    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
