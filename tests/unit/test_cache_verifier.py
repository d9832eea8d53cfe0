"""runtime.cache_verifier and runtime.cache_train: the shipped model loads offline, scores are deterministic and
ordered sensibly, thresholds follow the documented rule, feedback only raises thresholds. Pure: synthetic token
matrices stand in for MiniLM's (the cache benchmarks run the real model)."""

from __future__ import annotations

import json
import math
from importlib import resources

import numpy as np
import pytest

from runtime import cache_train as ct
from runtime import cache_verifier as cv
from runtime.settings import CacheSettings

pytestmark = pytest.mark.pure

DIM = 384


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    m = rng.standard_normal((n, DIM)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_the_packaged_model_loads_offline_and_describes_itself():
    path = resources.files("runtime") / "data" / cv.MODEL_FILE
    raw = json.loads(path.read_text(encoding="utf-8"))
    model = cv.load_model()
    # one version everywhere: the file the cache loads is named after the version the trainer writes
    assert model.version == raw["version"] == ct.VERSION == "v2"
    assert cv.MODEL_FILE == f"verifier_{ct.VERSION}.json"
    assert model.features == cv.FEATURES
    assert 0.5 < model.threshold < 1.0
    assert model.split_feature.shape[0] == model.leaf.shape[0] > 0
    assert model.split_feature.max() < len(cv.FEATURES)
    meta = model.metadata
    assert "STS-B train" in meta["data"] and meta["precision_target"] == 0.98
    assert meta["oof"]["precision"] >= 0.98
    assert meta["folds"] == ct.DEFAULT_FOLDS  # the shipped model is what `python -m runtime.cache_train` writes
    assert meta["loose_cosine"] == CacheSettings().verify_min_similarity
    assert len(model.idf) > 1000 and model.idf_default >= max(model.idf.values())


def test_json_round_trip_and_refusal_of_other_features():
    model = cv.load_model()
    again = cv.VerifierModel.from_json(json.loads(json.dumps(model.to_json())))
    x = np.random.default_rng(0).random((5, len(cv.FEATURES)))
    assert np.allclose(cv.margin(model, x), cv.margin(again, x))
    bad = model.to_json()
    bad["features"] = bad["features"][:-1]
    with pytest.raises(ValueError, match="other features"):
        cv.VerifierModel.from_json(bad)


def test_scores_identical_prompts_one_and_unrelated_ones_low():
    v = cv.Verifier()
    rng = np.random.default_rng(1)
    t = unit_rows(rng, 8)
    q = "How do I reverse a list in Python?"
    assert v.score(q, t, q, t, 1.0) == 1.0
    same = v.score(q, t, "How can I reverse a list in Python?", t, 0.98)
    other = v.score(q, t, "What is the tallest mountain in Africa?", unit_rows(rng, 9), 0.2)
    assert 0.0 <= other < v.threshold <= same <= 1.0
    # deterministic: a candidate's tokens stored as float16 score as they did
    packed = cv.unpack_tokens(cv.pack_tokens(t))
    assert abs(v.score(q, t, "How can I reverse a list in Python?", packed, 0.98) - same) < 1e-3


def test_threshold_override_and_per_entry_threshold():
    v = cv.Verifier(threshold=0.5)
    assert v.threshold == 0.5
    with pytest.raises(ValueError):
        cv.Verifier(threshold=1.5)
    rng = np.random.default_rng(2)
    t = unit_rows(rng, 6)
    q, c = "How do I reverse a list in Python?", "How can I reverse a list in Python?"
    ok, s = v.accepts(q, t, c, t, 0.98)
    assert ok
    ok_tight, _ = v.accepts(q, t, c, t, 0.98, min_score=min(1.0, s + 1e-6))
    assert not ok_tight


def test_tree_margins_walk_complete_trees():
    # one depth-2 tree: root splits feature 0 at 0.5; left child feature 1 at 0.0; right child never splits
    split_feature = np.array([[0, 1, 0]])
    split_value = np.array([[0.5, 0.0, math.inf]])
    leaf = np.array([[-1.0, 2.0, 3.0, 99.0]])
    x = np.array([[0.4, -1.0], [0.4, 1.0], [0.9, 5.0]])
    assert cv.tree_margins(x, split_feature, split_value, leaf, 2).tolist() == [-1.0, 2.0, 3.0]


def test_features_have_the_declared_shape_and_see_one_sided_words():
    rng = np.random.default_rng(3)
    t = unit_rows(rng, 7)
    model = cv.load_model()
    f = cv.features("How do I cook rice?", t, "How do I cook rice?", t, 1.0, model.idf, model.idf_default)
    g = cv.features("How do I cook rice?", t, "How do I cook saffron rice?", t, 0.95, model.idf, model.idf_default)
    assert f.shape == g.shape == (len(cv.FEATURES),)
    i = cv.FEATURES.index("idf_only_c")
    assert f[i] == 0.0 < g[i]
    assert cv.content_stems("The dogs were playing") == ("dog", "play")


def test_judge_falls_back_to_the_cosine_for_rows_without_tokens():
    cand = {"prompt": "p", "similarity": 0.96, "tokens": None, "min_score": 0.0}
    assert cv.judge(cv.Verifier(), "q", None, cand, 0.945) == (True, 0.96)
    assert cv.judge(None, "q", None, {**cand, "min_score": 0.97}, 0.945)[0] is False
    assert cv.judge(None, "q", None, {**cand, "similarity": 0.9}, 0.945)[0] is False


def test_tightened_only_raises_thresholds_above_what_the_query_scores():
    v = cv.Verifier()
    rng = np.random.default_rng(4)
    t = unit_rows(rng, 6)
    q = "What is the ibuprofen dose for a child?"
    near = {"key": "a" * 16, "prompt": "What is the right ibuprofen dose for a child?", "similarity": 0.97,
            "tokens": cv.pack_tokens(t), "min_score": 0.0}
    already = {**near, "key": "b" * 16, "min_score": 1.0}
    raised = cv.tightened(v, q, t, [near, already], floor=0.95, margin=0.02)
    assert set(raised) == {"a" * 16}  # a threshold already at the top is left alone
    s = v.score(q, t, near["prompt"], t, 0.97)
    assert raised["a" * 16] >= min(1.0, max(s, 0.95) + 0.02)
    assert not v.accepts(q, t, near["prompt"], t, 0.97, min_score=raised["a" * 16])[0]


def test_choose_threshold_takes_the_highest_recall_at_the_target_not_the_stricter_rule():
    # scores high to low; labels: one negative near the top, then a run of positives
    scores = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.90, 0.10])
    labels = np.array([1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    t, p, r = ct.choose_threshold(scores, labels, 0.85)
    # the stricter rule ("precision >= 0.85 at every higher threshold") would stop at 0.99 (precision 0.5 at
    # 0.98); ours takes 0.90, where 9 of the 10 pairs at or above are right
    assert t == 0.90 and p == pytest.approx(0.9) and r == 1.0
    assert math.isinf(ct.choose_threshold(scores, 1 - labels, 0.99)[0])


def test_gbt_and_platt_learn_a_separable_problem():
    rng = np.random.default_rng(5)
    x = rng.random((400, 3))
    y = ((x[:, 0] > 0.6) & (x[:, 1] < 0.5)).astype(float)
    base, f, v, leaf = ct.fit_gbt(x, y, n_trees=60, depth=2, learning_rate=0.3, seed=0)
    m = base + cv.tree_margins(x, f, v, leaf, 2)
    assert ((m > 0) == (y == 1)).mean() > 0.97
    a, b = ct.fit_platt(m, y)
    p = 1 / (1 + np.exp(-(a * m + b)))
    assert abs(p.mean() - y.mean()) < 0.02


def test_idf_table_weights_rare_words_more():
    idf, default = ct.idf_table(["the cat sat", "the cat ran", "a dog sat", "the cat slept"])
    assert idf["cat"] < default
    assert "slept" not in idf  # seen once: the default stands for it


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_tree_margins_equal_the_plain_walk(depth):
    rng = np.random.default_rng(depth)
    trees, feats, nodes = 300, 12, 2 ** depth - 1
    split_feature = rng.integers(0, feats, size=(trees, nodes))
    split_value = rng.standard_normal((trees, nodes))
    split_value[rng.random((trees, nodes)) < 0.2] = np.inf  # nodes that did not split: always left
    leaf = rng.standard_normal((trees, 2 ** depth))
    x = rng.standard_normal((7, feats))
    x[0, :] = split_value[0, 0]  # on a threshold exactly: "<=" goes left
    got = cv.tree_margins(x, split_feature, split_value, leaf, depth)
    # the level-by-level walk (what deeper trees still use) is the reference, leaf for leaf
    assert np.array_equal(got, cv._walk_margins(x, split_feature, split_value, leaf, depth))
