"""The grokking study's readings of its curves, on synthetic curves whose answers are known."""

import numpy as np
import pytest

from labpipe.grok.diagnostics import (
    SpikeDetector,
    correlation,
    grokking,
    grokking_index,
    plateau_stop,
    spike_effects,
)


def seed_like_curve(drop_epoch: int | None, epochs: int = 1000, every: int = 5, seed: int = 0):
    """The seed's wd = 0.03 run in shape: from ~11 down to a plateau near 3.5 (with 5% noise), then, at
    drop_epoch, a fall to ~2 over 10 epochs, and a slow drift after it."""
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(every, epochs + 1, every):
        loss = 3.5 + 7.5 * np.exp(-epoch / 40)
        if drop_epoch is not None and epoch > drop_epoch:
            loss -= 1.5 * min(1.0, (epoch - drop_epoch) / 10) + 0.0005 * (epoch - drop_epoch)
        history.append({"epoch": epoch, "val_loss": loss * (1 + 0.05 * rng.uniform(-1, 1))})
    return history


@pytest.mark.parametrize("drop_epoch", [520, 780])
def test_the_grokking_epoch_is_the_last_validation_on_the_plateau(drop_epoch):
    history = seed_like_curve(drop_epoch)
    index = grokking_index([r["val_loss"] for r in history], window=5, drop=0.3)
    assert history[index]["epoch"] == drop_epoch


@pytest.mark.parametrize("seed", range(5))
def test_no_grokking_on_a_plateau_or_an_initial_descent(seed):
    history = seed_like_curve(None, seed=seed)
    assert grokking_index([r["val_loss"] for r in history], window=5, drop=0.3) is None
    steady = [10 * 0.97**i for i in range(200)]  # a steady decline: a fall, but never after a plateau
    assert grokking_index(steady, window=5, drop=0.3) is None


def test_a_drop_that_comes_back_is_not_grokking():
    losses = [3.0] * 20 + [1.5, 1.5, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]  # falls by half, then returns
    assert grokking_index(losses, window=3, drop=0.3) is None
    sustained = [3.0] * 20 + [1.5] * 8
    assert grokking_index(sustained, window=3, drop=0.3) == 19


def test_grokking_reports_the_train_loss_and_weight_norm_change_over_the_drop():
    val = [{"epoch": 10 * (i + 1), "val_loss": loss} for i, loss in enumerate([3.0] * 8 + [1.0] * 6)]
    train = [{"epoch": e, "train_loss": 0.1 + 0.01 * e, "weight_norm": 50.0 - 0.1 * e} for e in range(1, 141)]
    found = grokking(val, train, window=3, drop=0.3)
    # last plateau validation: epoch 80; the drop's window ends 3 validations later, at epoch 110
    assert found == {"epoch": 80, "drop_end_epoch": 110, "val_loss_before": 3.0, "val_loss_after": 1.0,
                     "train_loss_change": pytest.approx(0.3), "weight_norm_change": pytest.approx(-3.0)}


def test_the_stop_rule_waits_for_patience_validations_without_improvement_after_grokking():
    losses = [3.0] * 10 + [1.5, 1.4, 1.3, 1.35, 1.32, 1.31, 1.36, 1.33]
    history = [{"epoch": 5 * (i + 1), "val_loss": v} for i, v in enumerate(losses)]
    assert plateau_stop(history, window=3, drop=0.3, patience=6) is None  # 5 validations since the best (1.3)
    reason = plateau_stop(history, window=3, drop=0.3, patience=5)
    assert reason == "no val improvement for 5 validations after grokking at epoch 50 (best 1.3 at epoch 65)"
    assert plateau_stop(history[:10], window=3, drop=0.3, patience=1) is None  # no grokking yet


def test_spike_effects_over_the_following_window():
    train = [{"epoch": e, "train_loss": 1.0, "weight_norm": 10.0 + e} for e in range(1, 31)]
    val = [{"epoch": e, "val_loss": 5.0 - 0.1 * e} for e in range(5, 31, 5)]
    effects = spike_effects([7, 28], train, val, window=10)
    assert effects[0] == {"epoch": 7, "train_loss": 1.0, "val_loss_change": pytest.approx((5 - 2.0) - (5 - 0.5)),
                          "weight_norm_change": pytest.approx(27.0 - 16.0)}
    assert effects[1]["val_loss_change"] is None  # no validation 10 epochs after it
    assert effects[1]["weight_norm_change"] == pytest.approx(40.0 - 37.0)  # to the run's last epoch


def test_spike_detector_flags_the_start_of_each_spike_only():
    detector = SpikeDetector(factor=2.0, window=3)
    losses = [8.0, 4.0, 2.0, 1.0, 1.1, 2.5, 3.0, 1.0, 0.9, 0.8, 0.7, 1.5, 0.5]
    started = [epoch for epoch, loss in enumerate(losses, start=1) if detector.update(loss)]
    # epoch 6: 2.5 > 2 x min(2, 1, 1.1); epoch 7 continues that spike; epoch 12: 1.5 > 2 x 0.7
    assert started == [6, 12]


def test_correlation_is_pearson_and_undefined_on_constants():
    x, y = [1.0, 2.0, 4.0, 7.0], [0.5, 0.7, 2.0, 2.2]
    assert correlation(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert correlation([1.0, 1.0], [2.0, 3.0]) is None and correlation([1.0], [2.0]) is None
