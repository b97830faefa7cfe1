import math
import pickle

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from labpipe.config import load_params
from labpipe.mheight.data import (
    DATASET,
    SCHEMA,
    generate,
    groups,
    import_pickles,
    read_dataset,
    run_data,
    subsample,
    write_dataset,
)
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
    frame = pd.DataFrame({"n": [9], "k": [4], "m": [2], "P": [np.arange(20.0)], "height": [math.inf]})
    write_dataset(frame, tmp_path / "d.parquet")
    back = read_dataset(tmp_path / "d.parquet")
    assert back.height.tolist() == [math.inf] and np.array_equal(back.P[0], np.arange(20.0))
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(ValueError, match=r"foreign.parquet: columns \(x: int64\) are not labpipe's"):
        read_dataset(tmp_path / "foreign.parquet")
    assert SCHEMA.names == ["n", "k", "m", "P", "height"]


def test_subsample_is_balanced_disjoint_and_seeded():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"n": 9, "k": np.repeat([4, 5], 50), "m": 2,
                          "P": list(rng.normal(size=(100, 20))), "height": rng.uniform(1, 9, 100)})
    frame["uid"] = np.arange(100)
    train, val = subsample(frame, 10, 15, seed=3)
    assert train.groupby("k").size().tolist() == [10, 10] and val.groupby("k").size().tolist() == [15, 15]
    assert not set(train.uid) & set(val.uid)
    again, _ = subsample(frame, 10, 15, seed=3)
    other, _ = subsample(frame, 10, 15, seed=4)
    assert train.uid.tolist() == again.uid.tolist() and train.uid.tolist() != other.uid.tolist()
    with pytest.raises(ValueError, match=r"group n=9 k=4 m=2 has 50 rows, fewer than .* = 60"):
        subsample(frame, 30, 30, seed=0)
