"""The response cache: keyed by the model version and the row as the model's transform reads it, an LRU of
serve.cache.size answers, emptied on a model switch, off at size 0; fully cached requests answered before the
batch queue."""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipelines.serving.cache import ResponseCache
from pipelines.transform import FeatureTransform

TRANSFORM = FeatureTransform(
    numeric=["age", "income"], categorical=["home"], normalize=True, impute="median", missing_indicators=True,
    fill_values={"age": 40.0, "income": 50_000.0}, clip_low={"age": 18.0, "income": 0.0},
    clip_high={"age": 90.0, "income": 1e6}, means={"age": 40.0, "income": 50_000.0},
    stds={"age": 10.0, "income": 20_000.0}, vocab={"home": ["own", "rent"]}, task="regression")


class Model:
    """A stand-in for ModelBundle: its answer is a function of the transformed row; it counts rows scored."""

    transform = TRANSFORM

    def __init__(self, version: str, on_score: Any = None) -> None:
        self.version, self.scored, self.on_score = version, 0, on_score

    def answers(self, rows: pd.DataFrame) -> list[dict[str, Any]]:
        self.scored += len(rows)
        if self.on_score:
            self.on_score()
        values = self.transform.transform(rows).sum(axis=1) * (1 + (self.version == "v2"))
        return [{"value": float(v), "version": self.version} for v in values]


def rows(*spelled: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"age": 41, "income": 52_000.0, "home": "rent", "_route": "champion", **r} for r in spelled]


def counts(cache: ResponseCache) -> dict[str, Any]:
    """The cache's own figures in its stats (without the unseen/out-of-reference counts, tested in test_bounds)."""
    return {k: v for k, v in cache.stats().items() if k in ("size", "entries", "hits", "misses")}


def frame(*spelled: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(rows(*spelled))


def test_rows_the_transform_reads_alike_share_one_entry():
    cache, model = ResponseCache(100), Model("v1")
    first = cache.answers(model, rows({}))
    same = cache.answers(model, rows({"home": "  RENT "}, {"age": 41.0}, {"income": 52_000}, {"_request_id": "x"}))
    assert same == first * 4 and model.scored == 1 and first == model.answers(frame({}))
    missing, median, nan = cache.answers(model, rows({"age": None}, {"age": 40}, {"age": float("nan")}))
    assert missing == nan != median  # imputed to the same value, but the missing flag is a feature of its own
    assert cache.answers(model, rows({"age": None}))[0] == missing and model.scored == 5  # 1, the check, 3
    above = cache.answers(model, rows({"age": 95}, {"age": 200}, {"home": "boat"}))
    assert above[0] == above[1] == model.answers(frame({"age": 90}))[0]  # two entries, the model's one answer
    assert counts(cache) == {"size": 100, "entries": 6, "hits": 5, "misses": 7}


def test_the_model_version_is_part_of_the_key():
    cache, champion, challenger = ResponseCache(100), Model("v1"), Model("v2")
    ours, theirs = cache.answers(champion, rows({})), cache.answers(challenger, rows({}))
    assert ours != theirs and ours == champion.answers(frame({})) and theirs == challenger.answers(frame({}))
    assert cache.answers(challenger, rows({})) == theirs and challenger.scored == 2  # 1 miss + the check above


def test_least_recently_used_goes_first_and_size_zero_keeps_nothing():
    cache, model = ResponseCache(2), Model("v1")
    cache.answers(model, rows({"age": 20}, {"age": 30}))
    cache.answers(model, rows({"age": 20}))  # 20 is now the most recent
    cache.answers(model, rows({"age": 50}))  # evicts 30
    assert model.scored == 3
    cache.answers(model, rows({"age": 20}, {"age": 50}))
    assert model.scored == 3
    cache.answers(model, rows({"age": 30}))
    assert model.scored == 4 and cache.stats()["entries"] == 2
    off, model = ResponseCache(0), Model("v1")
    off.answers(model, rows({}, {}))
    off.answers(model, rows({}))
    assert model.scored == 3 and counts(off) == {"size": 0, "entries": 0, "hits": 0, "misses": 0}


def test_a_switch_empties_it_and_answers_scored_across_the_switch_are_not_kept():
    cache, model = ResponseCache(100), Model("v1")
    cache.answers(model, rows({"age": 20}, {"age": 30}))
    cache.clear()
    assert cache.stats()["entries"] == 0
    switching = Model("v1", on_score=cache.clear)  # the registry follow switches models while this one scores
    assert cache.answers(switching, rows({"age": 60})) == model.answers(frame({"age": 60}))
    assert cache.stats()["entries"] == 0
    cache.answers(model, rows({"age": 20}))
    assert counts(cache) == {"size": 100, "entries": 1, "hits": 0, "misses": 4}


def test_cached_answers_all_or_none_and_count_only_when_told():
    cache, model = ResponseCache(100), Model("v1")
    assert cache.cached(model, rows({})) is None
    cache.answers(model, rows({"age": 20}))
    assert cache.cached(model, rows({"age": 20}, {"age": 30})) is None  # one missing: the request goes on
    assert cache.cached(model, rows({"age": 20.0})) == model.answers(frame({"age": 20}))
    cache.count_hits(1)
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1
    assert ResponseCache(0).cached(model, rows({})) is None


def test_the_models_input_frame_has_number_columns_even_when_every_value_is_missing():
    from pipelines.serving.cache import features

    frame = features(Model("v1"), rows({"age": None, "home": None}, {"age": None, "income": 7}))
    assert list(frame.columns) == ["age", "income", "home"]
    assert frame["age"].dtype == "float64" and frame["age"].isna().all() and frame["income"].tolist() == [52_000, 7]
    assert frame["home"].tolist() == [None, "rent"]
    assert Model("v1").answers(frame) == Model("v1").answers(pd.DataFrame(rows({"age": None, "home": None},
                                                                              {"age": None, "income": 7})))
