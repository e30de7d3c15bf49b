"""Linear probe on frozen image features, CLIP's protocol (Radford et al. 2021, appendix A.3).

scikit-learn's L-BFGS logistic regression; the inverse regularisation C is chosen on a
validation split (the set's own 'val' split, else a seeded share of 'train') by a coarse sweep
over 1e-6 .. 1e6 then a search halving the step around the best; the final classifier is fit on
train + validation with that C and scored once on the test split.
"""

from __future__ import annotations

import warnings

import numpy as np

COARSE = np.logspace(-6, 6, 7)  # 1e-6, 1e-4, ..., 1e6


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=1000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(x, y)


def choose_c(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, seed: int,
             refine_steps: int = 3) -> tuple[float, dict[float, float]]:
    """-> (best C, {C tried: validation accuracy}); ties keep the smaller C (the stronger regularisation)."""
    tried: dict[float, float] = {}

    def acc(log_c: float) -> float:
        c = float(10.0 ** log_c)
        if c not in tried:
            tried[c] = float((_fit(train_x, train_y, c, seed).predict(val_x) == val_y).mean())
        return tried[c]

    best = max(np.log10(COARSE), key=lambda lc: (acc(lc), -lc))
    step = 1.0  # the coarse grid's spacing is 2 decades: search +-1, +-0.5, +-0.25 around the best
    for _ in range(refine_steps):
        best = max((best - step, best, best + step), key=lambda lc: (acc(lc), -lc))
        step /= 2
    return float(10.0 ** best), tried


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train rows, validation rows) of n rows; at least one row on each side."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 val_x: np.ndarray | None = None, val_y: np.ndarray | None = None, val_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, float | None]:
    """clip_benchmark's linear-probe metrics (lp_acc1, lp_acc5, lp_mean_per_class_recall) and the chosen C."""
    from jobs.eval.scoring import balanced_accuracy

    if len(np.unique(train_y)) < 2:
        raise ValueError("the train split holds fewer than two classes: nothing to probe")
    if val_x is None or val_y is None:
        tr, va = validation_split(len(train_x), val_fraction, seed)
        fit_x, fit_y, val_x, val_y = train_x[tr], train_y[tr], train_x[va], train_y[va]
    else:
        fit_x, fit_y = train_x, train_y
    c, tried = choose_c(fit_x, fit_y, val_x, val_y, seed)
    final = _fit(np.concatenate([fit_x, val_x]), np.concatenate([fit_y, val_y]), c, seed)
    proba = final.predict_proba(test_x)
    classes = final.classes_
    ranked = classes[np.argsort(-proba, axis=1)]
    pred = ranked[:, 0]
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    return {
        "lp_acc1": float((pred == test_y).mean()),
        "lp_acc5": float((ranked[:, :5] == test_y[:, None]).any(1).mean()) if n_classes >= 5 else None,
        "lp_mean_per_class_recall": balanced_accuracy(test_y, pred),
        "C": c,
        "val_acc1": tried[c],
        "train_samples": float(len(fit_x) + len(val_x)),
    }
