import json
import math
import pickle

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO
from labpipe.config import load_params
from labpipe.mheight.data import (
    BOUND_STREAM,
    CODES_PER_TASK,
    DATASET,
    SCHEMA,
    TEST,
    TRAIN,
    VAL,
    difficulty_correlation,
    generate,
    groups,
    import_pickles,
    read_dataset,
    run_data,
    run_subsample,
    sampled_bounds,
    split_of,
    subsample,
    verify_imported,
    write_dataset,
)
from labpipe.mheight.exact import m_heights_batch
from reference import lp_m_height


def _params(*overrides):
    return load_params(REPO / "params.yaml", list(overrides)).mheight


def test_the_lab_groups():
    expected = [(9, 4, m) for m in range(2, 6)] + [(9, 5, m) for m in range(2, 5)] + [(9, 6, 2), (9, 6, 3)] \
        + [(10, 4, m) for m in range(2, 7)] + [(10, 5, m) for m in range(2, 6)] + [(10, 6, m) for m in range(2, 5)]
    assert groups(_params()) == expected and len(expected) == 21


def test_generated_codes_have_exact_heights_by_an_independent_lp():
    params = _params("mheight.n=[9]", "mheight.k=[4,5]", "mheight.samples_per_group=3", "mheight.workers=1")
    frame = generate(params)
    assert len(frame) == 3 * 7
    assert frame.P.map(lambda p: np.array_equal(p, np.round(p)) and np.abs(p).max() <= 100).all()
    for row in frame.iloc[::4].itertuples():  # a sample of rows through the LP (slow oracle)
        G = np.hstack([np.eye(row.k), row.P.reshape(row.k, row.n - row.k)])
        expected = lp_m_height(G, row.m)
        assert row.height == expected if math.isinf(expected) else row.height == pytest.approx(expected, rel=1e-9)


def test_generation_is_deterministic_and_independent_of_worker_count():
    base = ("mheight.n=[9]", "mheight.k=[6]", "mheight.samples_per_group=300")
    one = generate(_params(*base, "mheight.workers=1"))
    two = generate(_params(*base, "mheight.workers=2"))
    pd.testing.assert_frame_equal(one, two)
    other_seed = generate(_params(*base, "mheight.workers=1", "mheight.seed=1"))
    assert not np.array_equal(np.stack(one.P), np.stack(other_seed.P))


def test_real_entries_and_their_range():
    frame = generate(_params("mheight.n=[9]", "mheight.k=[6]", "mheight.samples_per_group=5",
                             "mheight.workers=1", "mheight.integer_entries=false", "mheight.p_max=2.5"))
    P = np.stack(frame.P)
    assert (np.abs(P) <= 2.5).all() and not np.array_equal(P, np.round(P))
    assert np.isfinite(frame.height).all()  # real P: MDS almost surely, every m <= n - k finite


def _course_pickle(path, **broken):
    rows = {"n": [9, 9], "k": [4, 4], "m": [2, 3], "P": [np.ones((4, 5)), np.full((4, 5), 2.0)],
            "result": [12.5, 40.0]}
    rows.update(broken)
    pd.DataFrame(rows).to_pickle(path)


def test_import_of_the_course_pickles(tmp_path):
    _course_pickle(tmp_path / "a.pkl")
    frame = import_pickles([str(tmp_path / "a.pkl")])
    assert frame.m.tolist() == [2, 3] and frame.height.tolist() == [12.5, 40.0]
    assert np.array_equal(frame.P[1], np.full(20, 2.0))
    assert frame.split.tolist() == ["", ""] and frame.record.tolist() == [0, 1]
    assert frame.file.tolist() == [str(tmp_path / "a.pkl")] * 2


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"P": [np.ones((4, 4)), np.ones((4, 5))]}, r"a\.pkl record 0: P has shape \(4, 4\), expected \(4, 5\)"),
        ({"P": [np.ones((4, 5)), np.array([[np.nan] * 5] * 4)]}, r"record 1: P\[0, 0\] = nan is not finite"),
        ({"m": [2, 9]}, r"record 1: m=9 is outside 0\.\.8 for n=9"),
        ({"result": [12.5, float("nan")]}, r"record 1: height nan is not a valid m-height"),
    ],
)
def test_bad_records_name_the_file_the_record_and_the_reason(tmp_path, broken, message):
    _course_pickle(tmp_path / "a.pkl", **broken)
    with pytest.raises(ValueError, match=message):
        import_pickles([str(tmp_path / "a.pkl")])


def test_a_pickle_with_missing_columns(tmp_path):
    pd.DataFrame({"n": [9], "k": [4], "P": [np.ones((4, 5))]}).to_pickle(tmp_path / "old.pkl")
    with pytest.raises(ValueError, match=r"old\.pkl: missing column\(s\) m, result"):
        import_pickles([str(tmp_path / "old.pkl")])
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ValueError, match="expected a pickled pandas DataFrame, got list"):
        import_pickles([str(tmp_path / "list.pkl")])


def test_stage_imports_pickles_when_present_and_writes_nothing_on_bad_input(project):
    directory, _ = project
    (directory / "data/mheight").mkdir(parents=True)
    _course_pickle(directory / "data/mheight/course.pkl")
    run_data(load_params("params.yaml"))
    assert read_dataset(DATASET).height.tolist() == [12.5, 40.0]

    DATASET.unlink()
    _course_pickle(directory / "data/mheight/course.pkl", m=[2, 11])
    with pytest.raises(ValueError, match="m=11 is outside"):
        run_data(load_params("params.yaml"))
    assert not DATASET.exists() and not list(DATASET.parent.glob("*.tmp"))


def test_forced_pickle_source_without_pickles(project):
    with pytest.raises(ValueError, match="mheight.source=pickles but data/mheight holds no"):
        run_data(load_params("params.yaml", ["mheight.source=pickles"]))


def test_dataset_schema_round_trip_and_foreign_files_refused(tmp_path):
    frame = pd.DataFrame({"n": [9], "k": [4], "m": [2], "P": [np.arange(20.0)], "height": [math.inf],
                          "bound": [7.5], "split": ["test"]})
    write_dataset(frame, tmp_path / "d.parquet")
    back = read_dataset(tmp_path / "d.parquet")
    assert back.height.tolist() == [math.inf] and np.array_equal(back.P[0], np.arange(20.0))
    assert back.bound.tolist() == [7.5] and back.split.tolist() == ["test"]
    write_dataset(frame.assign(split="holdout"), tmp_path / "odd.parquet")
    with pytest.raises(ValueError, match=r"odd.parquet row 0: split 'holdout' is not one of"):
        read_dataset(tmp_path / "odd.parquet")
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(ValueError, match=r"foreign.parquet: columns \(x: int64\) are not labpipe's"):
        read_dataset(tmp_path / "foreign.parquet")
    assert SCHEMA.names == ["n", "k", "m", "P", "height", "bound", "split"]


def _frame(splits, k=(4,)):
    """One row per entry of `splits` in each group n=9, k in `k`, m=2, told apart by `uid`."""
    rows = len(splits) * len(k)
    rng = np.random.default_rng(0)
    return pd.DataFrame({"n": 9, "k": np.repeat(k, len(splits)), "m": 2, "P": list(rng.normal(size=(rows, 20))),
                         "height": rng.uniform(1, 9, rows), "bound": 1.0, "split": list(splits) * len(k),
                         "uid": np.arange(rows)})


def test_subsample_is_balanced_disjoint_and_seeded():
    frame = _frame([""] * 50, k=(4, 5))
    train, val, test = subsample(frame, 10, 15, 5, seed=3)
    assert [s.groupby("k").size().tolist() for s in (train, val, test)] == [[10, 10], [15, 15], [5, 5]]
    assert len(set(train.uid) | set(val.uid) | set(test.uid)) == 60  # disjoint
    assert (train.split == "train").all() and (val.split == "val").all() and (test.split == "test").all()
    # The unassigned rows of group i are shared out from one permutation, train first: the draw before splits.
    for group_index, k in enumerate((4, 5)):
        order = frame.uid[frame.k == k].to_numpy()[np.random.default_rng([3, group_index]).permutation(50)]
        assert train.uid[train.k == k].tolist() == order[:10].tolist()
        assert val.uid[val.k == k].tolist() == order[10:25].tolist()
        assert test.uid[test.k == k].tolist() == order[25:30].tolist()
    again, *_ = subsample(frame, 10, 15, 5, seed=3)
    other, *_ = subsample(frame, 10, 15, 5, seed=4)
    assert train.uid.tolist() == again.uid.tolist() and train.uid.tolist() != other.uid.tolist()
    *_, none = subsample(frame, 10, 15, 0, seed=3)
    assert len(none) == 0 and list(none.columns) == list(frame.columns)


def test_subsample_draws_within_the_course_splits_and_shares_the_rest():
    frame = _frame(["train"] * 8 + ["test"] * 6 + [""] * 12)
    train, val, test = subsample(frame, 5, 7, 4, seed=0)
    assert set(train.uid) <= set(range(8)) and set(test.uid) <= set(range(8, 14))
    assert set(val.uid) <= set(range(14, 26))  # the dataset has no val rows: val draws from the unassigned ones
    assert (len(train), len(val), len(test)) == (5, 7, 4) and len(set(train.uid) | set(val.uid) | set(test.uid)) == 16


@pytest.mark.parametrize(
    ("splits", "sizes", "message"),
    [
        (["train"] * 20 + ["test"] * 3 + [""] * 20, (5, 5, 4), r"^group n=9 k=4 m=2 has 3 test rows, fewer than "
         r"mheight\.test_per_group = 4 \(set mheight\.test_per_group=0 for no test split\)$"),
        ([""] * 50, (30, 30, 0), r"^group n=9 k=4 m=2 has 50 unassigned rows for train \+ val, fewer than "
         r"mheight\.train_per_group \+ mheight\.val_per_group = 60$"),
        (["val"] * 3 + [""] * 9, (4, 3, 6), r"^group n=9 k=4 m=2 has 9 unassigned rows for train \+ test, fewer than "
         r"mheight\.train_per_group \+ mheight\.test_per_group = 10 \(set mheight\.test_per_group=0"),
    ],
)
def test_too_few_rows_name_the_group_the_split_and_the_keys(splits, sizes, message):
    with pytest.raises(ValueError, match=message):
        subsample(_frame(splits), *sizes, seed=0)


@pytest.mark.parametrize(
    ("name", "split"),
    [("data/mheight/train.pkl", "train"), ("course_Train_2024.pkl", "train"), ("mheight-valid.pkl", "val"),
     ("VAL.pkl", "val"), ("validation_set.pkl", "val"), ("test1.pkl", "test"), ("training.pkl", ""),
     ("train_test.pkl", ""), ("all.pkl", ""), ("contest.pkl", "")],
)
def test_split_from_the_file_name(name, split):
    assert split_of(name) == split


def _course_file(path, uids):
    """A course pickle of group n=9 k=4 m=2 whose records carry their uid in P and in the height."""
    pd.DataFrame({"n": 9, "k": 4, "m": 2, "P": [np.full((4, 5), float(u)) for u in uids],
                  "result": [1.0 + u for u in uids]}).to_pickle(path)


def test_the_course_split_survives_import_and_subsample(project):
    directory, _ = project
    (directory / "data/mheight").mkdir(parents=True)
    _course_file(directory / "data/mheight/m_height_train.pkl", range(0, 8))
    _course_file(directory / "data/mheight/m_height_test.pkl", range(8, 14))
    _course_file(directory / "data/mheight/extra.pkl", range(14, 26))
    overrides = ["mheight.violation_samples=0", "mheight.verify_imported=0", "mheight.train_per_group=5",
                 "mheight.val_per_group=7", "mheight.test_per_group=4"]
    run_data(load_params("params.yaml", overrides))
    dataset = read_dataset(DATASET)
    uid = dataset.P.map(lambda p: int(p[0]))
    assert dict(zip(uid, dataset.split, strict=True)) == {u: "train" if u < 8 else "test" if u < 14 else ""
                                                          for u in range(26)}
    assert (dataset.bound == 1.0).all()  # violation_samples = 0
    run_subsample(load_params("params.yaml", overrides))
    drawn = {path: read_dataset(path) for path in (TRAIN, VAL, TEST)}
    uids = {path: set(frame.P.map(lambda p: int(p[0]))) for path, frame in drawn.items()}
    assert uids[TRAIN] <= set(range(8)) and uids[TEST] <= set(range(8, 14)) and uids[VAL] <= set(range(14, 26))
    assert [len(uids[path]) for path in (TRAIN, VAL, TEST)] == [5, 7, 4]
    assert [frame.split.unique().tolist() for frame in drawn.values()] == [["train"], ["val"], ["test"]]
    assert all((frame.height == 1.0 + frame.P.map(lambda p: p[0])).all() for frame in drawn.values())


def _codeword_heights(G, x, m):
    """h_m(xG) for each message x (a row), one codeword at a time by the definition."""
    heights = []
    for message in x:
        c = sorted(np.abs(message @ G), reverse=True)
        heights.append(math.inf if c[m] == 0 else c[0] / c[m])
    return np.array(heights)


def test_the_sampled_bound_never_exceeds_the_exact_height_and_is_the_max_over_the_same_messages():
    frame = generate(_params("mheight.n=[9]", "mheight.k=[4,5]", "mheight.samples_per_group=40", "mheight.workers=1"))
    assert len(frame) == 280 > CODES_PER_TASK  # two chunks, the first spanning several groups
    bounds = sampled_bounds(frame, 64, seed=0)
    exact = np.concatenate([
        m_heights_batch(np.stack([np.hstack([np.eye(k), p.reshape(k, 9 - k)]) for p in rows.P]))[:, m]
        for (k, m), rows in frame.groupby(["k", "m"], sort=False)])
    assert (bounds >= 1).all() and (bounds <= exact * (1 + 1e-12)).all()
    assert np.median(bounds[frame.m >= 2] / exact[frame.m >= 2]) < 1  # a lower bound, not the height itself
    # The messages of chunk c: one (rows, samples, max k) Gaussian draw from the stream [seed, BOUND_STREAM, c].
    for row in (0, 100, 200, 260, 279):
        chunk = row // CODES_PER_TASK
        rows = frame.iloc[chunk * CODES_PER_TASK:(chunk + 1) * CODES_PER_TASK]
        x = np.random.default_rng([0, BOUND_STREAM, chunk]).standard_normal((len(rows), 64, rows.k.max()))
        code = frame.iloc[row]
        G = np.hstack([np.eye(code.k), code.P.reshape(code.k, code.n - code.k)])
        assert bounds[row] == pytest.approx(_codeword_heights(G, x[row % CODES_PER_TASK, :, :code.k], code.m).max(),
                                            rel=1e-12)
    assert (sampled_bounds(frame, 0, seed=0) == 1.0).all()


def test_the_sampled_bound_is_reproducible_and_independent_of_workers():
    frame = generate(_params("mheight.n=[9]", "mheight.k=[6]", "mheight.samples_per_group=150", "mheight.workers=1"))
    one = sampled_bounds(frame, 16, seed=5, workers=1)
    assert np.array_equal(one, sampled_bounds(frame, 16, seed=5, workers=1))
    assert np.array_equal(one, sampled_bounds(frame, 16, seed=5, workers=3))
    assert not np.array_equal(one, sampled_bounds(frame, 16, seed=6, workers=1))


def test_data_stats_group_difficulty_matches_pandas(project):
    overrides = ["mheight.n=[9]", "mheight.k=[4,5]", "mheight.samples_per_group=12", "mheight.workers=1",
                 "mheight.violation_samples=16"]
    run_data(load_params("params.yaml", overrides))
    stats = json.loads((DATASET.parent / "data_stats.json").read_text())
    frame = read_dataset(DATASET)
    frame["group"] = [f"n{n}_k{k}_m{m}" for n, k, m in zip(frame.n, frame.k, frame.m, strict=True)]
    finite = frame[np.isfinite(frame.height)].assign(log2_h=lambda f: np.log2(f.height),
                                                      gap=lambda f: np.log2(f.height) - np.log2(f.bound))
    by_group = finite.groupby("group")
    every = frame.assign(infinite=np.isinf(frame.height)).groupby("group")
    expected = pd.DataFrame({
        "rows": every.size(),
        "infinite": every.infinite.sum(),
        "share_infinite": every.infinite.mean(),
        "m_over_k": every.m.first() / every.k.first(),
        "log2_h_mean": by_group.log2_h.mean(),
        "log2_h_std": by_group.log2_h.std(ddof=0),
        "mean_log2_bound_gap": by_group.gap.mean(),
    })
    assert sorted(stats["groups"]) == sorted(expected.index) and len(expected) == 7
    for name, group in stats["groups"].items():
        for key, value in expected.loc[name].items():
            assert (group[key] is None) if pd.isna(value) else group[key] == pytest.approx(value, rel=1e-12), key
    assert (expected.mean_log2_bound_gap.dropna() >= 0).all()
    corr = expected.m_over_k.corr(expected.log2_h_std)  # Pearson over the groups with a std
    assert stats["corr_m_over_k_log2_h_std"] == pytest.approx(corr, rel=1e-12)

    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("mheight-grokking").experiment_id])
    assert run.data.metrics["corr_m_over_k_log2_h_std"] == pytest.approx(corr, rel=1e-12)
    assert {f"log2_h_std/{name}": pytest.approx(std, rel=1e-12) for name, std in expected.log2_h_std.dropna().items()} \
        == {key: value for key, value in run.data.metrics.items() if key.startswith("log2_h_std/")}


def test_the_difficulty_correlation_is_none_where_undefined():
    def group(m_over_k, std):
        return {"m_over_k": m_over_k, "log2_h_std": std}

    assert difficulty_correlation({"a": group(0.5, 1.0)}) is None
    assert difficulty_correlation({"a": group(0.5, 1.0), "b": group(0.5, 2.0)}) is None  # m/k constant
    assert difficulty_correlation({"a": group(0.5, 1.0), "b": group(1.0, None), "c": group(0.25, 1.0)}) is None
    assert difficulty_correlation({"a": group(0.5, 1.0), "b": group(1.0, 3.0), "c": group(0.25, 0.5)}) \
        == pytest.approx(np.corrcoef([0.5, 1.0, 0.25], [1.0, 3.0, 0.5])[0, 1])


def test_verify_imported_reports_the_corrupted_records_by_file_and_record(project, capsys):
    directory, _ = project
    (directory / "data/mheight").mkdir(parents=True)
    codes = generate(_params("mheight.n=[9]", "mheight.k=[4]", "mheight.samples_per_group=2", "mheight.workers=1"))
    codes = codes[np.isfinite(codes.height)].reset_index(drop=True).iloc[:6]
    result = codes.height.to_numpy().copy()
    result[4] *= 1.5  # corrupted
    pd.DataFrame({"n": codes.n, "k": codes.k, "m": codes.m, "P": [p.reshape(4, 5) for p in codes.P],
                  "result": result}).to_pickle(directory / "data/mheight/train.pkl")
    # P = ones: x = (1, -1, 0, 0) has weight 2, so d = 2 and h_2 = inf; 12.5 is wrong, inf right.
    pd.DataFrame({"n": 9, "k": 4, "m": 2, "P": [np.ones((4, 5))] * 3, "result": [math.inf, 12.5, math.inf]}) \
        .to_pickle(directory / "data/mheight/val.pkl")
    run_data(load_params("params.yaml", ["mheight.violation_samples=8", "mheight.verify_imported=100"]))

    verify = json.loads((DATASET.parent / "data_stats.json").read_text())["verify"]
    assert verify == {"checked": 9, "mismatched": 2, "examples": [
        {"file": "data/mheight/train.pkl", "record": 4, "n": 9, "k": 4, "m": int(codes.m[4]),
         "stored": pytest.approx(1.5 * codes.height[4]), "exact": pytest.approx(codes.height[4])},
        {"file": "data/mheight/val.pkl", "record": 1, "n": 9, "k": 4, "m": 2, "stored": 12.5, "exact": math.inf},
    ]}
    out = capsys.readouterr().out
    assert f"data/mheight/train.pkl record 4: stored height {1.5 * codes.height[4]:.10g}, " in out
    assert "data/mheight/val.pkl record 1: stored height 12.5, exact inf" in out
    assert "verify_imported: 2 of 9 checked records differ" in out
    assert "record 0:" not in out and "record 2:" not in out
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("mheight-grokking").experiment_id])
    assert run.data.metrics["verify_mismatched"] == 2

    imported = import_pickles([str(directory / "data/mheight/train.pkl"), str(directory / "data/mheight/val.pkl")])
    sample = verify_imported(imported, 3, seed=0, device="cpu")
    assert sample["checked"] == 3 and sample == verify_imported(imported, 3, seed=0, device="cpu")
