"""One damping rule for every iHVP method, applied when solving, never when fitting.

Every solver computes (C + Lambda)^{-1} v for its own curvature estimate C (EK-FAC's
eigenvalues, DataInf's empirical Fisher, LiSSA's minibatch GGN, a Monte-Carlo Fisher
inverted exactly) and a damping Lambda = lambda_l I on each tracked layer l. Methods compared in
one table must share Lambda: if each method scaled its damping by its *own* curvature, two
methods given "0.1 x the mean eigenvalue" would regularise differently (DataInf's empirical
Fisher and the true Fisher differ in trace by the model's loss scale), and a difference in
ranking could come from Lambda alone.

The rule: lambda_l = factor x tr(F_l) / P_l, the mean eigenvalue of layer l's diagonal block of
the true Fisher (= the GGN for cross-entropy) of the training set, P_l the layer's entries.
tr(F_l) = E_y |g_l(y)|^2 is estimated without bias from per-sequence gradients whose labels are
drawn from the model (``collect_grads(fisher="true")``), so the reference is computed once per
model and every method receives the same numbers. ``absolute`` bypasses the rule.

Fitting is undamped: ``fit_ekfac`` / ``fit_kfac`` store the curvature; the damping is an
argument of the solve (``KFAC.with_damping(dict)``, ``LowRank.with_damping``, ``DataInf``,
``LiSSA``, ``CG``).
"""

from __future__ import annotations

import math

from influence.modules import LayerGrads

FACTOR = 0.1  # the fixed rule: 0.1 x each layer's mean eigenvalue
SWEEP = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)  # factors of a damping sweep


def mean_eigenvalues(grads: LayerGrads) -> dict[str, float]:
    """{layer: tr(F_l) / P_l} for F = (1/n) sum_i g_i g_i^T of the n gradients ``grads``
    ({layer: (n, d_out, d_in')}), computed in float64. With labels drawn from the model the
    gradients give the true Fisher's (an unbiased estimate); with the data's labels, the
    empirical Fisher's."""
    out = {}
    for name, g in grads.items():
        if g.dim() != 3 or g.shape[0] == 0:
            raise ValueError(f"grads[{name!r}] has shape {tuple(g.shape)}: expected (n > 0, o, i)")
        # Sum of squares in float64, 64 rows at a time: no float64 copy of all n gradients.
        total = sum(float(rows.double().pow(2).sum()) for rows in g.split(64))
        out[name] = total / (g.shape[0] * g[0].numel())
    return out


def damping(
    reference: dict[str, float], factor: float = FACTOR, *, absolute: float | None = None
) -> dict[str, float]:
    """{layer: lambda_l}: ``factor`` x the layer's mean eigenvalue ``reference[layer]``
    (``mean_eigenvalues``), or ``absolute`` for every layer when given."""
    if absolute is not None:
        if not (math.isfinite(absolute) and absolute > 0):
            raise ValueError(f"absolute damping must be finite and > 0, got {absolute!r}")
        return dict.fromkeys(reference, float(absolute))
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"damping factor must be finite and > 0, got {factor!r}")
    bad = {n: v for n, v in reference.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(
            f"mean eigenvalues must be finite and > 0 (no gradient reached these layers?): {bad}"
        )
    return {n: factor * v for n, v in reference.items()}
