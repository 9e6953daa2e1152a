"""Explanations: how much each input column moved each prediction, in the space of the answer.

An explanation of a row is a base value and one contribution per input column of the table (a numeric column's
`<column>_missing` flag is part of it), per class for classification, with base + sum of contributions = the
answer (probability of each class, or the value) up to floating-point rounding. How each model gets there:

- **LightGBM, XGBoost**: exact tree SHAP (the boosters' own `pred_contrib`), in the booster's raw margin space
  (log-odds, softmax logits, values). Its base is the expected margin of the training rows, mapped through the
  link (sigmoid or softmax): the answer at the base margin. The margin contributions are carried into
  probabilities along the straight path from the base margin to the row's margin (integrated gradients of the
  link): for the sigmoid that is each column's share of the margin change times the probability change, so
  signs and ranks stay those of tree SHAP; for the softmax the path integral is taken by Gauss-Legendre
  quadrature and its remainder (under 1e-9) spread over the columns in proportion to their size.
- **MLP (float32 or int8)**: Shapley values over the input columns by antithetic permutation sampling
  (PERMUTATIONS orders, seeded: the same row always gets the same explanation), against one baseline row:
  every number at its training mean (not missing) and every category the unknown one. Each order's marginal
  contributions add up exactly to answer - base, so their mean does too; the int8 copy, which has no
  gradients, is explained the same way, through its own int8 forward passes.
- **Ensemble**: its members' explanations combined the way it combines their outputs: averaging, blending and
  bagging weight them (bases too); stacking carries each member's contributions into its meta-features (the
  clipped logit or log probabilities, elementwise: each column's share of the change), through the linear
  meta-learner, then through its link as above.

A column that no model reads (never split on, or equal to the baseline) gets exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit, softmax

from pipelines.models import Ensemble, LightGBMLearner, MLPLearner, XGBoostLearner
from pipelines.models.base import Learner
from pipelines.transform import UNKNOWN, FeatureTransform

PERMUTATIONS = 16  # orders sampled per row for the MLP (antithetic pairs): rows x 16 x columns forward passes
QUADRATURE = 16  # Gauss-Legendre nodes of the softmax path integral
CLIP = 1e-6  # the stacking meta-features' clip (pipelines.models.ensemble)
CHUNK_ROWS = 65536  # encoded rows per forward pass of the permutation method


@dataclass
class Explanation:
    """Per row: `base` (n, d) and `contributions` (n, columns, d), d the classes (or 1 for a value), in the
    output space of the answer; `output` (n, d) = base + contributions summed over the columns."""

    columns: list[str]
    base: np.ndarray
    contributions: np.ndarray
    output: np.ndarray
    method: str


def column_groups(transform: FeatureTransform) -> tuple[list[str], np.ndarray]:
    """The input columns, and a 0/1 matrix (encoded features x columns) that sums each feature into its column."""
    columns = [*transform.numeric, *transform.categorical]
    index = {c: i for i, c in enumerate(columns)}
    names = transform.feature_names
    groups = np.zeros((len(names), len(columns)))
    for f, name in enumerate(names):
        owner = name if name in index else name.removesuffix("_missing")
        groups[f, index[owner]] = 1.0
    return columns, groups


def explain(transform: FeatureTransform, ensemble: Ensemble, rows: pd.DataFrame) -> Explanation:
    """The explanation of raw `rows` (as sent to the API or collected) by the bundle of `transform` and `ensemble`."""
    X = transform.transform(rows)
    columns, groups = column_groups(transform)
    # the permutation method's reference row: numbers at their training mean (0 once standardized), no missing
    # flag set, every category the unknown code (UNKNOWN is 0)
    base, contributions, output = _ensemble(ensemble, X, groups, np.full(X.shape[1], float(UNKNOWN)))
    return Explanation(columns, base, contributions, output, describe(ensemble))


def describe(ensemble: Ensemble) -> str:
    """The method, in words, for the answer and the README."""
    methods = {"lightgbm": "tree SHAP", "xgboost": "tree SHAP",
               "mlp": f"permutation Shapley over columns, {PERMUTATIONS} orders"}
    parts = [f"{name} ({methods[member.kind]}{', int8' if getattr(member, 'int8', False) else ''})"
             for name, member in zip(ensemble.names, ensemble.members_, strict=True)]
    return f"{ensemble.method} of " + ", ".join(parts) if len(parts) > 1 else parts[0]


def _ensemble(ensemble: Ensemble, X: pd.DataFrame, groups: np.ndarray, baseline: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = [_learner(m, X, groups, baseline) for m in ensemble.members_]
    bases = np.stack([p[0] for p in parts], axis=1)  # (n, members, d)
    contribs = np.stack([p[1] for p in parts], axis=2)  # (n, columns, members, d)
    outputs = np.stack([p[2] for p in parts], axis=1)  # (n, members, d)
    task = ensemble.task
    target = _as_2d(ensemble.combine(outputs if task != "regression" else outputs[..., 0]))
    if ensemble.method != "stacking":
        w = np.asarray(ensemble.weights_, dtype="float64")
        return _complete(np.einsum("m,nmd->nd", w, bases), np.einsum("m,ncmd->ncd", w, contribs), target)
    n, n_cols = contribs.shape[:2]
    if task == "binary":  # meta-features: each member's clipped logit of the positive class
        meta_base, meta_c = _elementwise(_clipped_logit, _clipped_logit_slope, bases[..., 1], contribs[..., 1],
                                         _clipped_logit(outputs[..., 1]))
    elif task == "multiclass":  # the clipped log probabilities of every class, member by member
        meta_base, meta_c = _elementwise(_clipped_log, _clipped_log_slope, bases, contribs, _clipped_log(outputs))
        meta_base, meta_c = meta_base.reshape(n, -1), meta_c.reshape(n, n_cols, -1)
    else:  # the values
        meta_base, meta_c = bases[..., 0], contribs[..., 0]
    W = np.asarray(ensemble.weights_, dtype="float64").reshape(-1, meta_base.shape[1])  # (outputs, meta-features)
    z_base = meta_base @ W.T + np.asarray(ensemble.intercept_, dtype="float64")
    z_c = meta_c @ W.T  # (n, columns, outputs)
    if task == "binary":
        p1_base, p1_c = _elementwise(expit, _sigmoid_slope, z_base, z_c, target[:, 1:2])
        return _complete(np.concatenate([1 - p1_base, p1_base], axis=1),
                         np.concatenate([-p1_c, p1_c], axis=2), target)
    if task == "multiclass":
        return _complete(*_through_softmax(z_base, z_c), target)
    return _complete(z_base, z_c, target)


def _learner(learner: Learner, X: pd.DataFrame, groups: np.ndarray, baseline: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base (n, d), contributions (n, columns, d), output (n, d)) of one fitted learner on encoded rows `X`."""
    output = _as_2d(learner.predict_output(X))
    if isinstance(learner, MLPLearner):
        return _permutation_shapley(_mlp_forward(learner, list(X.columns)), X.to_numpy(dtype="float64"), output,
                                    groups, baseline)
    if isinstance(learner, (LightGBMLearner, XGBoostLearner)):
        margin = _tree_contributions(learner, X)  # (n, features + 1, margins)
        base_m, phi = margin[:, -1, :], np.einsum("nfk,fc->nck", margin[:, :-1, :], groups)
        if learner.task == "binary":
            p1_base, p1_c = _elementwise(expit, _sigmoid_slope, base_m, phi, output[:, 1:2])
            return _complete(np.concatenate([1 - p1_base, p1_base], axis=1),
                             np.concatenate([-p1_c, p1_c], axis=2), output)
        if learner.task == "multiclass":
            return _complete(*_through_softmax(base_m, phi), output)
        return _complete(base_m, phi, output)
    raise TypeError(f"no explanation method for a {type(learner).__name__}")


def _mlp_forward(learner: MLPLearner, columns: list[str]) -> Callable[[np.ndarray], np.ndarray]:
    """The MLP's output (n, d) for encoded rows as an array in the order of `columns`: what predict_output gives
    for them as a frame, without building one per call (its numeric and category columns picked by position)."""
    import torch

    cats = list(learner._categorical)  # the embeddings' order (the network takes the codes in it)
    numeric = [columns.index(c) for c in learner.columns_ if c not in cats]
    codes = [columns.index(c) for c in cats]

    def forward(Z: np.ndarray) -> np.ndarray:
        num = torch.from_numpy(np.ascontiguousarray(Z[:, numeric], dtype="float32")).to(learner.device_)
        cat = torch.from_numpy(np.ascontiguousarray(Z[:, codes]).astype("int64")).to(learner.device_)
        return _as_2d(learner._predict(num, cat))

    return forward


def _tree_contributions(learner: LightGBMLearner | XGBoostLearner, X: pd.DataFrame) -> np.ndarray:
    """Tree SHAP in the margin space: (n, features + 1, margins), the last feature being the bias."""
    n, f = X.shape
    if isinstance(learner, LightGBMLearner):
        booster = learner.booster_
        raw = np.asarray(booster.predict(X.to_numpy(dtype="float64"), pred_contrib=True,
                                         num_iteration=booster.best_iteration or None))
        return raw.reshape(n, -1, f + 1).transpose(0, 2, 1)
    import xgboost as xgb

    xgb_booster = learner.booster_
    best = getattr(xgb_booster, "best_iteration", None)
    types = ["c" if c in learner._categorical else "q" for c in X.columns]
    matrix = xgb.DMatrix(learner._codes(X), feature_names=[str(c) for c in X.columns], feature_types=types,
                         enable_categorical=True, nthread=learner.threads)
    raw = np.asarray(xgb_booster.predict(matrix, pred_contribs=True,
                                     iteration_range=(0, best + 1) if best is not None else (0, 0)))
    return raw.reshape(n, -1, f + 1).transpose(0, 2, 1)


def _permutation_shapley(model: Callable[[np.ndarray], np.ndarray], X: np.ndarray, output: np.ndarray,
                         groups: np.ndarray, baseline: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shapley values of the columns (groups of encoded features) by PERMUTATIONS antithetic orders: along each
    order the columns switch from `baseline` to the row's values one by one, and each is credited with the change
    of the output. The last step of every order ends at the row itself, whose output is `output` (the answer),
    so each order's credits add up to output - base exactly."""
    n, n_cols, d = len(X), groups.shape[1], output.shape[1]
    rng = np.random.default_rng(0)
    half = [rng.permutation(n_cols) for _ in range(PERMUTATIONS // 2)]
    orders = np.asarray([*half, *(o[::-1] for o in half)])  # (orders, columns)
    base = model(baseline[None, :])  # (1, d)
    member = groups.T.astype(bool)  # (columns, features)
    # switched[o, t]: the features already at the row's values after t + 1 steps of order o (its inner points)
    switched = np.cumsum(member[orders[:, :-1]], axis=1) > 0  # (orders, columns - 1, features)
    contributions = np.zeros((n, n_cols, d))
    step = max(1, CHUNK_ROWS // max(switched.shape[0] * switched.shape[1], 1))
    for start in range(0, n, step):
        rows = X[start:start + step]
        points = np.where(switched[None], rows[:, None, None, :], baseline)  # (rows, orders, columns - 1, features)
        inner = model(points.reshape(-1, X.shape[1])).reshape(*points.shape[:3], d) if n_cols > 1 else (
            np.zeros((len(rows), len(orders), 0, d)))
        shape = (len(rows), len(orders), 1, d)
        path = np.concatenate([np.broadcast_to(base[None, None], shape), inner,
                               np.broadcast_to(output[start:start + step, None, None, :], shape)], axis=2)
        # a step that switches a column already at the baseline changes no input: its point keeps the model's value
        # of the point before it (an int8 net's value of one input varies with the batch it is scored in), and
        # points after the last step that changes anything are the row itself: the answer
        same = np.stack([(rows[:, member[c]] == baseline[member[c]]).all(axis=1) for c in range(n_cols)], axis=1)
        noop = same[:, orders]  # (rows, orders, columns): step t of order o changes nothing
        for t in range(n_cols - 1):
            path[:, :, t + 1] = np.where(noop[:, :, t, None], path[:, :, t], path[:, :, t + 1])
        tail = np.flip(np.cumprod(np.flip(noop, axis=2), axis=2), axis=2).astype(bool)  # steps t.. all change nothing
        path[:, :, 1:-1] = np.where(tail[:, :, 1:, None], path[:, :, -1:], path[:, :, 1:-1])
        steps = np.diff(path, axis=2)  # (rows, orders, columns, d): the credit of each order's t-th column
        for o, order in enumerate(orders):
            contributions[start:start + step, order, :] += steps[:, o]
    contributions /= len(orders)
    return _complete(np.repeat(base, n, axis=0), contributions, output)


def _elementwise(h: Callable[[np.ndarray], np.ndarray], slope: Callable[[np.ndarray], np.ndarray], base: np.ndarray,
                 contributions: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contributions to x carried through an elementwise map h: each column gets its share of the change of x
    times the change of h (the path integral of h' along the straight path, exact for any h). `base` and
    `after` (= h(base + sum of contributions)) are (n, ...), contributions (n, columns, ...)."""
    delta = contributions.sum(axis=1)
    change = after - h(base)
    flat = np.abs(delta) < 1e-12
    ratio = np.where(flat, slope(base), change / np.where(flat, 1.0, delta))
    return h(base), contributions * ratio[:, None, ...]


def _through_softmax(base: np.ndarray, contributions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logit contributions (n, columns, k) carried into probabilities: the softmax's Jacobian integrated along
    the path from the base logits to the row's (Gauss-Legendre)."""
    nodes, weights = np.polynomial.legendre.leggauss(QUADRATURE)
    t, w = (nodes + 1) / 2, weights / 2
    delta = contributions.sum(axis=1)
    jac = np.zeros((len(base), base.shape[1], base.shape[1]))
    for ti, wi in zip(t, w, strict=True):
        p = softmax(base + ti * delta, axis=1)
        jac += wi * (np.einsum("nk,kl->nkl", p, np.eye(p.shape[1])) - np.einsum("nk,nl->nkl", p, p))
    return softmax(base, axis=1), np.einsum("nkl,ncl->nck", jac, contributions)


def _complete(base: np.ndarray, contributions: np.ndarray, target: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Completeness enforced: what base + contributions misses of `target` (rounding, quadrature) spread over
    the columns in proportion to their size (a column at 0 stays 0)."""
    residual = target - base - contributions.sum(axis=1)
    size = np.abs(contributions)
    total = size.sum(axis=1)
    share = np.divide(size, total[:, None, :], out=np.zeros_like(size), where=total[:, None, :] > 0)
    return base, contributions + share * residual[:, None, :], target


def _as_2d(output: np.ndarray) -> np.ndarray:
    return output.reshape(len(output), -1)


def _clipped_logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, CLIP, 1 - CLIP)
    return np.log(q) - np.log1p(-q)


def _clipped_logit_slope(p: np.ndarray) -> np.ndarray:
    inside = (p > CLIP) & (p < 1 - CLIP)
    return np.where(inside, 1.0 / np.clip(p * (1 - p), CLIP, None), 0.0)


def _clipped_log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, CLIP, 1.0))


def _clipped_log_slope(p: np.ndarray) -> np.ndarray:
    return np.where(p > CLIP, 1.0 / np.clip(p, CLIP, None), 0.0)


def _sigmoid_slope(z: np.ndarray) -> np.ndarray:
    s = expit(z)
    return s * (1 - s)


def answer_part(explanation: Explanation, i: int, classes: list[str] | None) -> dict[str, Any]:
    """Row i's explanation as the API answers it: the base and the contributions per column, per class (by name)
    for classification, or of the value."""
    base, contrib = explanation.base[i], explanation.contributions[i]
    if classes is None:
        return {"method": explanation.method, "output": "value", "base": float(base[0]),
                "contributions": dict(zip(explanation.columns, contrib[:, 0].tolist(), strict=True))}
    return {"method": explanation.method, "output": "probability",
            "base": dict(zip(classes, base.tolist(), strict=True)),
            "contributions": {c: dict(zip(explanation.columns, contrib[:, k].tolist(), strict=True))
                              for k, c in enumerate(classes)}}


def mean_abs(explanation: Explanation) -> np.ndarray:
    """Mean |contribution| per column and class (columns, d) over the explained rows."""
    return np.abs(explanation.contributions).mean(axis=0)


def importance(found: Explanation) -> dict[str, Any]:
    """Global importance: mean |contribution| per column over the explained rows, over all classes together and
    per class for classification (by class index); with the number of rows and the method."""
    per_class = mean_abs(found)  # (columns, d)
    return {"columns": found.columns, "mean_abs": dict(zip(found.columns, per_class.sum(axis=1).tolist(), strict=True)),
            "per_class": [dict(zip(found.columns, per_class[:, k].tolist(), strict=True))
                          for k in range(per_class.shape[1])] if per_class.shape[1] > 1 else None,
            "rows": len(found.base), "method": found.method}


def attribution_drift(reference: dict[str, float], current: dict[str, float], top: int) -> dict[str, Any]:
    """How far the ranking of the columns by mean |contribution| moved: 1 - NDCG@top of the current ranking, each
    column graded by its reference rank (the first of the top columns `top`, the next `top` - 1, ..., the others
    0; gain 2^grade - 1, so the top columns weigh most): 0 is the same top columns in the same order. With the
    columns whose share of the attribution moved most (at least half the largest move)."""
    columns = list(reference)
    ref = np.array([reference[c] for c in columns])
    cur = np.array([current.get(c, 0.0) for c in columns])
    ref_share = ref / ref.sum() if ref.sum() > 0 else np.zeros_like(ref)
    cur_share = cur / cur.sum() if cur.sum() > 0 else np.zeros_like(cur)
    k = min(top, len(columns))
    grade = np.zeros(len(columns))
    grade[np.argsort(-ref_share, kind="stable")[:k]] = np.arange(k, 0, -1)
    gain, discount = 2.0**grade - 1, 1 / np.log2(np.arange(k) + 2)
    ideal = float(np.sort(gain)[::-1][:k] @ discount)
    ndcg = float(gain[np.argsort(-cur_share, kind="stable")[:k]] @ discount) / ideal if ideal > 0 else 1.0
    moved = np.abs(cur_share - ref_share)
    named = [columns[i] for i in np.argsort(-moved, kind="stable") if moved[i] > 0 and moved[i] >= moved.max() / 2]
    return {"attribution_drift": round(1 - ndcg, 6), "attribution_drift_columns": named, "attribution_top": k,
            "attribution_shares": {c: {"reference": round(float(r), 6), "current": round(float(s), 6)}
                                   for c, r, s in zip(columns, ref_share, cur_share, strict=True)}}
