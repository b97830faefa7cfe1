import dataclasses

import pytest
import yaml

from conftest import REPO, write_params
from labpipe.cli import profile_flags
from labpipe.config import ConfigError, Params, flatten, load_params


def test_repo_params_load_into_typed_frozen_dataclasses():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.tracking.wandb == "off"  # YAML 1.2, as DVC reads it: `off` is a string, not False
    assert params.mheight.n == (9, 10) and isinstance(params.grok.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.grok.lr = 1.0


def test_overrides_are_typed_and_applied():
    params = load_params(REPO / "params.yaml", ["grok.weight_decay=0.03", "mheight.n=[9]", "grok.model=moe",
                                                "tracking.wandb=offline", "grok.epochs=7"])
    assert params.grok.weight_decay == 0.03
    assert params.mheight.n == (9,)
    assert params.grok.model == "moe" and params.tracking.wandb == "offline" and params.grok.epochs == 7


def test_int_is_accepted_for_a_float_but_not_the_reverse():
    assert load_params(REPO / "params.yaml", ["grok.lr=1"]).grok.lr == 1.0
    with pytest.raises(ConfigError, match=r"grok\.epochs must be int, got float 1\.5"):
        load_params(REPO / "params.yaml", ["grok.epochs=1.5"])
    with pytest.raises(ConfigError, match=r"grok\.epochs must be int, got bool True"):
        load_params(REPO / "params.yaml", ["grok.epochs=true"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("grok.weight_decy=0.1", r"unknown key 'grok\.weight_decy'.*valid keys under grok: seed, model"),
        ("grokk.lr=0.1", r"unknown key 'grokk\.lr'.*valid keys under the top level: tracking, mheight, grok"),
        ("grok=1", r"'grok' is a section"),
        ("grok.lr.x=1", r"'grok\.lr' is a value"),
        ("grok.lr", r"not of the form section\.key=value"),
        ("grok.model=vit", r"grok\.model must be one of resnet, moe; got 'vit'"),
        ("mheight.n=9", r"mheight\.n must be a list"),
        ("mheight.n=[9, x]", r"mheight\.n\[1\] must be int, got str 'x'"),
        ("hmm.eps=0.01", r"hmm\.eps=0\.01 must be below 1 / max\(hmm\.hidden_states, hmm\.vocab_size\) = 0\.01"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_params(REPO / "params.yaml", [override])


def test_unknown_and_missing_keys_in_the_file(tmp_path, repo_params):
    repo_params["grok"]["learning_rate"] = 0.1
    path = write_params(tmp_path, repo_params)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) grok\.learning_rate; valid keys under 'grok': seed"):
        load_params(path)
    del repo_params["grok"]["learning_rate"], repo_params["grok"]["lr"]
    with pytest.raises(ConfigError, match=r"missing key\(s\) grok\.lr"):
        load_params(write_params(tmp_path, repo_params))
    repo_params["grok"] = [1, 2]
    with pytest.raises(ConfigError, match=r"'grok\.' must be a mapping|'grok' must be a mapping"):
        load_params(write_params(tmp_path, repo_params))


def test_missing_params_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_flatten_uses_dotted_keys_that_round_trip_as_overrides():
    params = load_params(REPO / "params.yaml")
    flat = flatten(params)
    assert flat["grok.weight_decay"] == params.grok.weight_decay and flat["mheight.n"] == [9, 10]
    overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for key, value in flat.items()]
    assert load_params(REPO / "params.yaml", overrides) == params


def test_full_profile_becomes_checked_dvc_flags(tmp_path):
    flags = profile_flags(str(REPO / "params.yaml"), str(REPO / "params.full.yaml"))
    assert "-S grok.epochs=10000" in flags and "-S mheight.train_per_group=5000" in flags
    assert all(" " not in flag.removeprefix("-S ") for flag in flags)  # safe for $(...) word splitting
    bad = tmp_path / "bad.yaml"
    bad.write_text("grok:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'grok\.epochz'"):
        profile_flags(str(REPO / "params.yaml"), str(bad))


@pytest.mark.parametrize("profile", [None, "params.full.yaml"])
def test_the_generated_m_height_data_holds_the_three_splits(profile):
    """mheight_subsample draws train + val + test disjointly from samples_per_group generated codes."""
    overrides = [f.removeprefix("-S ") for f in profile_flags(str(REPO / "params.yaml"), str(REPO / profile))] \
        if profile else []
    p = load_params(REPO / "params.yaml", overrides).mheight
    assert p.train_per_group + p.val_per_group + p.test_per_group <= p.samples_per_group


def test_the_full_profile_trains_the_lm_on_20_tokens_per_parameter_in_one_epoch():
    """The compute-optimal budget (Hoffmann et al. 2022) for the seed's ~100M Llama, with no row seen twice."""
    import torch

    from labpipe.lm.train import build_model

    flags = profile_flags(str(REPO / "params.yaml"), str(REPO / "params.full.yaml"))
    full = load_params(REPO / "params.yaml", [flag.removeprefix("-S ") for flag in flags])
    with torch.device("meta"):  # the shapes alone
        model = build_model(full.lm, full.lm.vocab_size or full.hmm.vocab_size)
    parameters = sum(p.numel() for p in model.parameters())
    tokens = full.lm.max_steps * full.lm.batch_size * full.lm.grad_accum_steps * full.synth.seq_length
    assert 110e6 < parameters < 120e6 and 20 <= tokens / parameters < 20.1
    assert tokens <= full.synth.train_shards * full.synth.sequences_per_shard * full.synth.seq_length
    assert full.lm.decay_steps == full.lm.max_steps  # the cosine ends where the run does


def test_cli_reports_config_errors_without_a_traceback(capsys):
    from labpipe.cli import main

    assert main(["params", "--params", str(REPO / "params.yaml"), "--set", "grok.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "labpipe params: error: unknown key 'grok.nope'" in err and "Traceback" not in err


def _numeric_fields():
    """(dotted key, base type, Bound or None) for every int/float param, list items as key[0]."""
    import typing

    from labpipe.config import Bound, _field_types

    for section, section_type in _field_types(Params).items():
        if not dataclasses.is_dataclass(section_type):
            continue
        for name, tp in _field_types(section_type).items():
            key = f"{section}.{name}"
            if typing.get_origin(tp) is tuple:
                tp, key = typing.get_args(tp)[0], key + "[0]"
            base, *extras = typing.get_args(tp) if typing.get_origin(tp) is typing.Annotated else (tp,)
            if base in (int, float):
                yield key, base, next((e for e in extras if isinstance(e, Bound)), None)


def test_every_numeric_param_declares_its_range():
    assert [key for key, _base, bound in _numeric_fields() if bound is None] == []


def _outside(base, bound):
    """Values just outside `bound`, and the non-finite floats."""
    if bound.low is not None:
        yield bound.low if bound.low_open else bound.low - (1 if base is int else 1e-9 * max(1, abs(bound.low)))
    if bound.high is not None:
        yield bound.high if bound.high_open else bound.high + (1 if base is int else 1e-9 * max(1, abs(bound.high)))
    if base is float:
        yield from (".nan", ".inf", "-.inf")


@pytest.mark.parametrize(("key", "base", "bound"), list(_numeric_fields()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_a_value_outside_the_declared_range_is_refused_naming_key_and_range(key, base, bound):
    """Generated from the schema: every bound of every numeric param, through --set as through params.yaml."""
    name, _, item = key.partition("[")
    for value in _outside(base, bound):
        override = f"{name}=[{value}]" if item else f"{name}={value}"
        with pytest.raises(ConfigError) as refused:
            load_params(REPO / "params.yaml", [override])
        message = str(refused.value)
        assert key in message and "must be" in message and "\n" not in message, message
