"""Inverse-Hessian-vector-product (iHVP) solvers behind one interface.

Every solver has ``ihvp(v) -> (H + damping I)^{-1} v`` (or its documented approximation) for
a batch of Q query gradients v = {layer name: (Q, d_out, d_in')} in the canonical layout of
``influence.modules``, and returns the same shapes. H is the curvature averaged per sequence:
the GGN / true Fisher (``influence.ggn``), or for DataInf and ``LiSSAAsPublished`` the
empirical Fisher (1/n) sum_i g_i g_i^T of the training gradients. Scores are then
grad m(q)^T ihvp(grad L(z)) (positive = proponent), never multiplied by N.

Damping is absolute: a float for every layer, or {layer: float}. ``relative_damping`` turns a
factor into absolute values: factor x mean eigenvalue of G (trace / P), per layer or overall.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from influence.damping import damping as damping_rule
from influence.ggn import GGN
from influence.modules import LayerGrads, flatten, pair_dots, unflatten

Damping = float | dict[str, float]


class Solver(Protocol):
    def ihvp(self, v: LayerGrads) -> LayerGrads: ...


def _per_layer(damping: Damping, names) -> dict[str, float]:
    """{layer: damping} from a float or a dict, checked to be >= 0 and to cover every layer."""
    if isinstance(damping, dict):
        missing = [n for n in names if n not in damping]
        if missing:
            raise ValueError(f"damping has no value for layers {missing}")
        values = {n: float(damping[n]) for n in names}
    else:
        values = dict.fromkeys(names, float(damping))
    bad = {n: d for n, d in values.items() if not d >= 0}
    if bad:
        raise ValueError(f"damping must be >= 0, got {bad}")
    return values


def _flat(v: LayerGrads, shapes: dict[str, tuple[int, int]]) -> torch.Tensor:
    """{name: (Q, d_out, d_in')} -> (Q, P) float64 in ``shapes`` order, with clear errors."""
    if set(v) != set(shapes):
        raise ValueError(f"v has layers {sorted(v)}, the solver expects {sorted(shapes)}")
    for name, shape in shapes.items():
        if v[name].dim() != 3 or tuple(v[name].shape[1:]) != shape:
            raise ValueError(
                f"v[{name!r}] has shape {tuple(v[name].shape)}, expected (Q, {shape[0]}, "
                f"{shape[1]}): add a leading query dimension"
            )
    return flatten({n: v[n] for n in shapes}).double()


def _damping_vector(damping: dict[str, float], shapes, dtype=torch.float64) -> torch.Tensor:
    """(P,) the damping of each parameter, in ``flatten`` order."""
    return torch.cat(
        [torch.full((o * i,), damping[n], dtype=dtype) for n, (o, i) in shapes.items()]
    )


def relative_damping(factor: float, ggn: GGN, per_layer: bool = True) -> dict[str, float]:
    """Absolute damping = factor x mean eigenvalue of G.

    per_layer: lam_l = factor * tr(G_ll) / P_l (the layer's diagonal block, as the
    block-diagonal solvers see it): the project's rule (``influence.damping.damping``) with
    the exact reference instead of its sampled estimate; otherwise lam = factor * tr(G) / P
    for every layer. Uses ``GGN.trace`` (exact, P Jacobian-vector products).
    """
    traces = ggn.trace()
    sizes = {n: o * i for n, (o, i) in ggn.shapes.items()}
    if per_layer:
        return damping_rule({n: traces[n] / sizes[n] for n in traces}, factor)
    total = sum(traces.values()) / sum(sizes.values())
    return dict.fromkeys(traces, damping_rule({"G": total}, factor)["G"])


def _check_nonsingular(s: torch.Tensor) -> None:
    """Eigenvalues ``s`` (ascending) of a damped block, checked to be safely positive."""
    if s.min() <= len(s) * torch.finfo(s.dtype).eps * s.max():
        raise ValueError(
            f"G + damping is singular (eigenvalues {s.min().item():.3g} to "
            f"{s.max().item():.3g}): use a positive damping"
        )


@dataclass
class Identity:
    """Hessian-free ("gradient dot product", paper B's ``gradient_match``): ihvp(v) = v.

    Plain v, not v / damping: scores are raw gradient dot products, the limit of
    damping * (H + damping I)^{-1} as damping -> infinity.
    """

    def ihvp(self, v: LayerGrads) -> LayerGrads:
        return {name: x.clone() for name, x in v.items()}


@dataclass
class Exact:
    """(G + lam I)^{-1} v through the eigendecomposition G + lam I = U diag(s) U^T, in float64.

    ``matrix``: a dense (P, P) curvature in ``flatten`` order of ``shapes`` (``GGN.dense()``,
    ``GGN.empirical_fisher_dense()``, ...). ``block_diagonal``: keep only each layer's
    diagonal block and invert the blocks separately (what per-layer methods approximate).
    ihvp(v) = U diag(1 / s) U^T v. ``damping`` may differ per layer. Memory P^2; eigh O(P^3).
    """

    matrix: torch.Tensor
    shapes: dict[str, tuple[int, int]]
    damping: Damping = 0.0
    block_diagonal: bool = False
    eigvals: list[torch.Tensor] = field(init=False, repr=False)  # of G + lam I, per block
    eigvecs: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self):
        p = sum(o * i for o, i in self.shapes.values())
        if tuple(self.matrix.shape) != (p, p):
            raise ValueError(
                f"matrix has shape {tuple(self.matrix.shape)}, the layers need ({p}, {p})"
            )
        lam = _damping_vector(_per_layer(self.damping, self.shapes), self.shapes)
        matrix = self.matrix.double().cpu()
        sizes = [o * i for o, i in self.shapes.values()] if self.block_diagonal else [p]
        self._blocks, self.eigvals, self.eigvecs, start = [], [], [], 0
        for size in sizes:
            block = slice(start, start + size)
            s, u = torch.linalg.eigh(matrix[block, block] + torch.diag(lam[block]))
            _check_nonsingular(s)
            self._blocks.append(block)
            self.eigvals.append(s)
            self.eigvecs.append(u)
            start += size

    @classmethod
    def from_ggn(cls, ggn: GGN, damping: Damping = 0.0, block_diagonal: bool = False) -> Exact:
        return cls(ggn.dense(), ggn.shapes, damping, block_diagonal)

    def with_damping(self, damping: Damping) -> Exact:
        """The same matrix with another damping. When the old and the new damping are each
        constant on every block, G + lam' I has the eigenvectors of G + lam I and eigenvalues
        shifted by lam' - lam: no new eigendecomposition. Otherwise it is decomposed again."""
        old = _damping_vector(_per_layer(self.damping, self.shapes), self.shapes)
        new = _damping_vector(_per_layer(damping, self.shapes), self.shapes)
        shifts = [new[block] - old[block] for block in self._blocks]
        if not all(bool((d == d[0]).all()) for d in shifts):
            return Exact(self.matrix, self.shapes, damping, self.block_diagonal)
        out = copy.copy(self)
        out.damping = damping
        out.eigvals = [s + d[0] for s, d in zip(self.eigvals, shifts, strict=True)]
        for s in out.eigvals:
            _check_nonsingular(s)
        return out

    def ihvp(self, v: LayerGrads) -> LayerGrads:
        x = _flat(v, self.shapes).cpu()  # (Q, P)
        out = torch.empty_like(x)
        for block, s, u in zip(self._blocks, self.eigvals, self.eigvecs, strict=True):
            out[:, block] = ((x[:, block] @ u) / s) @ u.T
        like = next(iter(v.values()))
        return unflatten(out.to(like), self.shapes)


@dataclass
class LowRank:
    """Exact (F + D)^{-1} v for a low-rank curvature F = (1/n) sum_i u_i u_i^T, any P.

    ``rows``: the n vectors u_i ({layer: (n, d_out, d_in')}): per-example training gradients
    (F = the empirical Fisher, DataInf's matrix, exactly inverted), gradients with labels drawn
    from the model (a Monte-Carlo true Fisher), or the columns of ``GGN.jacobian`` (the GGN).
    D is the damping: lam_l on the entries of layer l (a float: the same for every layer).
    With U = (n, P) and the Woodbury identity,
        (U^T U / n + D)^{-1} v = D^{-1} v - D^{-1} U^T (n I + U D^{-1} U^T)^{-1} U D^{-1} v,
    and one (n, n) eigendecomposition of U D^{-1} U^T serves every multiple c D of the damping
    (a damping sweep: ``with_damping``); another per-layer profile costs one more. The inverse is
    exact to float64 round-off for the matrix F (a Monte-Carlo Fisher is itself an estimate).
    ``eigenvalues``: F's nonzero spectrum (descending; the other P - n are 0). Memory n P;
    O(n^2 P) per profile.
    """

    rows: LayerGrads | None  # read once, then dropped (see __post_init__)
    damping: Damping = 1.0

    def __post_init__(self):
        self.shapes = {name: tuple(g.shape[1:]) for name, g in self.rows.items()}
        self._blocks = {}  # layer -> slice of its columns in u
        start = 0
        for name, (o, i) in self.shapes.items():
            self._blocks[name], start = slice(start, start + o * i), start + o * i
        # Straight to float64, layer by layer into one buffer, and the rows are not kept: this
        # solver holds the one (n, P) float64 matrix it needs (notebooks 04-06 invert n P ~ 1e8).
        first = next(iter(self.rows.values()))
        self.u = torch.empty(first.shape[0], start, dtype=torch.float64, device=first.device)
        for name, g in self.rows.items():
            self.u[:, self._blocks[name]].copy_(g.flatten(start_dim=1))
        self.rows = None
        if not all(torch.isfinite(part).all() for part in self.u.split(64)):  # no n x P temporary
            raise ValueError("rows hold NaN or inf: check the gradients")
        self.lam = self._checked(self.damping)
        # {profile shape: (profile, s, w)} with U diag(profile)^-1 U^T = W S W^T, shared by
        # every copy (``with_damping``): one eigendecomposition per shape of the damping
        # across layers (a rule's profile, a uniform absolute damping), reused by its multiples.
        self._bases: dict[tuple, tuple] = {}
        self._spectrum: torch.Tensor | None = None

    def _checked(self, damping: Damping) -> dict[str, float]:
        lam = _per_layer(damping, self.shapes)
        bad = {n: d for n, d in lam.items() if not (math.isfinite(d) and d > 0)}
        if bad:
            raise ValueError(f"LowRank needs a finite damping > 0 on every layer, got {bad}")
        return lam

    def _gram(self, profile: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenpairs (ascending) of U diag(profile)^-1 U^T, summed layer by layer."""
        n = self.u.shape[0]
        gram = torch.zeros(n, n, dtype=torch.float64, device=self.u.device)
        for name, block in self._blocks.items():
            part = self.u[:, block]
            gram += (part @ part.T) / profile[name]
        s, w = torch.linalg.eigh(gram)
        return s.clamp(min=0), w

    def _shape(self) -> tuple:
        """The damping's profile across layers up to a factor (its multiples share a basis)."""
        first = self.lam[next(iter(self.lam))]
        return tuple(round(v / first, 12) for v in self.lam.values())

    def _eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenpairs of U D^-1 U^T for this damping, reusing those of a profile of which D is
        a multiple."""
        key = self._shape()
        if key not in self._bases:
            self._bases[key] = (dict(self.lam), *self._gram(self.lam))
        profile, s, w = self._bases[key]
        first = next(iter(self.lam))
        return s / (self.lam[first] / profile[first]), w

    @property
    def eigenvalues(self) -> torch.Tensor:
        """F's nonzero spectrum s / n, descending (one eigendecomposition of U U^T, cached)."""
        if self._spectrum is None:
            s, _ = self._gram(dict.fromkeys(self.shapes, 1.0))
            self._spectrum = s.flip(0) / self.u.shape[0]
        return self._spectrum

    def with_damping(self, damping: Damping) -> LowRank:
        """The same matrix with another damping (no new eigendecomposition for a multiple of
        a per-layer profile already used by this matrix or a copy of it)."""
        out = copy.copy(self)  # shares u and the eigendecompositions (self._bases)
        out.damping, out.lam = damping, self._checked(damping)
        return out

    def ihvp(self, v: LayerGrads) -> LayerGrads:
        x = _flat(v, self.shapes).to(self.u)  # (Q, P)
        d = _damping_vector(self.lam, self.shapes).to(self.u)  # (P,)
        s, w = self._eig()
        y = x / d
        coef = ((y @ self.u.T) @ w) / (self.u.shape[0] + s)  # (Q, n) in the eigenbasis
        out = y - ((coef @ w.T) @ self.u) / d
        like = next(iter(v.values()))
        return unflatten(out.to(like), self.shapes)


def datainf_damping(train_grads: LayerGrads, lambda_const: float = 10.0) -> dict[str, float]:
    """DataInf's per-layer damping: lam_l = mean_i mean_j (g_ij^2) / lambda_const.

    That is 0.1 x mean_i |g_i|^2 / D_l at the default lambda_const = 10 (D_l = entries of
    the layer), as in the reference code (ykwon0407/DataInf, ``compute_hvp_proposed``).
    """
    return {n: float(g.double().pow(2).mean()) / lambda_const for n, g in train_grads.items()}


@dataclass
class DataInf:
    """DataInf (Kwon et al. 2024): a closed-form per-layer inverse.

    With the n training gradients g_i of layer l (``train_grads``: {layer: (n, d_out, d_in')})
    it swaps the inverse and the average:
        (1/n sum_i g_i g_i^T + lam_l I)^{-1} ~ (1/n) sum_i (g_i g_i^T + lam_l I)^{-1}
    and each term has a Sherman-Morrison closed form, so
        ihvp(v)_l = (1/lam_l) (v - (1/n) sum_i [(g_i . v) / (lam_l + |g_i|^2)] g_i).
    ``damping=None`` uses DataInf's heuristic ``datainf_damping(train_grads, lambda_const)``.
    """

    train_grads: LayerGrads
    damping: Damping | None = None
    lambda_const: float = 10.0

    def __post_init__(self):
        names = list(self.train_grads)
        if self.damping is None:
            self.damping = datainf_damping(self.train_grads, self.lambda_const)
        self.lam = _per_layer(self.damping, names)
        zero = [n for n, d in self.lam.items() if d == 0]
        if zero:
            raise ValueError(f"DataInf divides by the damping; it is 0 for layers {zero}")

    def ihvp(self, v: LayerGrads) -> LayerGrads:
        out = {}
        for name, x in v.items():
            g = self.train_grads[name].to(x)  # (n, d_out, d_in')
            lam = self.lam[name]
            coef = pair_dots(x, g) / (lam + g.pow(2).sum((1, 2)))  # (Q, n)
            out[name] = (x - torch.einsum("qn,noi->qoi", coef, g) / g.shape[0]) / lam
        return out


@dataclass
class LiSSA:
    """LiSSA (Agarwal et al. 2017) with stochastic GGN-vector products.

    With A = G + lam I and a scale s > lambda_max(A):
        h_0 = v,   h_{j+1} = v + (I - A_j / s) h_j,   result h_J / s,
    where A_j = G_{B_j} + lam I uses the GGN of one minibatch B_j of ``ggn.batches``, drawn
    with probability proportional to its size (so E[G_B] = G). Unrolled,
    h_J = sum_{k<=J} (I - A/s)^k v -> s A^{-1} v, and the error of the result is
    (I - A/s)^{J+1} A^{-1} v: it shrinks like (1 - lambda_min(A)/s)^{J+1}. Each step's
    batch is independent of h_j, so E[result] equals the deterministic recursion with the full
    G; ``repeats`` independent runs are averaged. Cost: depth x repeats GGN products.
    ``scale`` must exceed lambda_max(G) + lam (``largest_eigenvalue`` estimates it), or the
    recursion diverges. ``callback(j, h_j / s)``, if given, sees every step's estimate (of the
    current repeat): accuracy against GGN products in one run.
    """

    ggn: GGN
    damping: Damping = 0.0
    scale: float = 10.0
    depth: int = 100
    repeats: int = 1
    seed: int = 0
    callback: Callable[[int, LayerGrads], None] | None = None

    def __post_init__(self):
        if self.scale <= 0 or self.depth < 0 or self.repeats < 1:
            raise ValueError(
                f"need scale > 0, depth >= 0, repeats >= 1; got scale={self.scale}, "
                f"depth={self.depth}, repeats={self.repeats}"
            )
        self.lam = _per_layer(self.damping, self.ggn.shapes)

    def ihvp(self, v: LayerGrads) -> LayerGrads:
        gen = torch.Generator().manual_seed(self.seed)
        sizes = torch.tensor([b["input_ids"].shape[0] for b in self.ggn.batches], dtype=torch.float)
        total = {n: torch.zeros_like(x) for n, x in v.items()}
        for _ in range(self.repeats):
            h = {n: x.clone() for n, x in v.items()}
            for step in range(self.depth):
                batch = self.ggn.batches[int(torch.multinomial(sizes, 1, generator=gen))]
                gh = self.ggn.matvec(h, batches=[batch])
                h = {n: v[n] + h[n] - (gh[n] + self.lam[n] * h[n]) / self.scale for n in h}
                if self.callback is not None:
                    self.callback(step + 1, {n: x / self.scale for n, x in h.items()})
            for n in total:
                total[n] += h[n]
        return {n: x / (self.repeats * self.scale) for n, x in total.items()}


@dataclass
class LiSSAAsPublished:
    """Paper B's published LiSSA (plumprc/Failures-of-Influence-Functions-in-LLMs, utils.py).

    Per layer, with the empirical Fisher G_l = (1/n) sum_i g_i g_i^T of ``train_grads`` and
    DataInf's damping lam_l = mean_i mean(g_i^2) / lambda_const, their code runs
        h_0 = v,   h_{j+1} = v + h_j - alpha (G_l h_j - lam_l h_j) / 1000
    for ``iterations`` = 3 steps (their --iter default; alpha = 1) and returns h_J. Compared
    with ``LiSSA`` the damping enters with the opposite sign (it solves G - lam I), the
    scale 1000 divides the product but the result is not divided by it, and 3 steps are far
    from convergence. Unrolled, h_J = sum_{k<=J} (I - (G - lam I)/1000)^k v, which is
    (J + 1) v = 4 v up to O(|G| / 1000): a gradient dot product times 4.
    """

    train_grads: LayerGrads
    lambda_const: float = 10.0
    iterations: int = 3
    scale: float = 1000.0  # hard-coded as 1e3 in the published code
    alpha: float = 1.0

    def __post_init__(self):
        self.lam = datainf_damping(self.train_grads, self.lambda_const)

    def ihvp(self, v: LayerGrads) -> LayerGrads:
        out = {}
        for name, x in v.items():
            g = self.train_grads[name].to(x)  # (n, d_out, d_in')
            h = x.clone()
            for _ in range(self.iterations):
                gh = torch.einsum("noi,qn->qoi", g, pair_dots(h, g)) / g.shape[0]
                h = x + h - self.alpha * (gh - self.lam[name] * h) / self.scale
            out[name] = h
        return out


@dataclass
class CGInfo:
    """residuals: (iterations + 1, Q) relative residuals |v - A x_k| / |v|; products: number of
    single-vector GGN products (Q per iteration); iterations: CG steps taken."""

    residuals: torch.Tensor
    products: int
    iterations: int


@dataclass
class CG:
    """Conjugate gradient on A x = v with A = G + lam I, the exact damped GGN products.

    Runs the Q queries in lockstep (one batched GGN product per step), each with its own
    step sizes, until every relative residual |v - A x| / |v| <= tol or ``max_iters`` steps.
    In exact arithmetic CG ends within P steps. ``preconditioner``: any solver whose
    ``ihvp`` approximates A^{-1} (symmetric positive definite), e.g. EK-FAC or ``Exact``
    (block-diagonal) - preconditioned CG then needs few products when it is accurate, 1
    when it is A^{-1} itself. ``ihvp`` stores its ``CGInfo`` in ``self.info``.
    ``callback(k, x_k)``, if given, sees the iterate (float64) after every step k.
    """

    ggn: GGN
    damping: Damping = 0.0
    max_iters: int = 100
    tol: float = 1e-10
    preconditioner: Solver | None = None
    callback: Callable[[int, LayerGrads], None] | None = None
    info: CGInfo | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.lam = _damping_vector(_per_layer(self.damping, self.ggn.shapes), self.ggn.shapes)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        """A x for (Q, P) flattened vectors."""
        gx = flatten(self.ggn.matvec(self.ggn.unflatten(x.to(self.ggn.dtype))))
        return gx.to(x) + self.lam.to(x) * x

    def _precondition(self, r: torch.Tensor) -> torch.Tensor:
        if self.preconditioner is None:
            return r.clone()
        return flatten(self.preconditioner.ihvp(self.ggn.unflatten(r))).to(r)

    def solve(self, v: LayerGrads) -> tuple[LayerGrads, CGInfo]:
        b = _flat(v, self.ggn.shapes)  # (Q, P)
        norm_b = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
        x = torch.zeros_like(b)
        r = b.clone()
        z = self._precondition(r)
        p, rz = z.clone(), (r * z).sum(1)
        history = [r.norm(dim=1) / norm_b]
        products = 0
        for _ in range(self.max_iters):
            active = history[-1] > self.tol  # (Q,) converged queries take no more steps
            if not active.any():
                break
            ap = self._apply(p)
            products += b.shape[0]
            alpha = torch.where(active, rz / (p * ap).sum(1), torch.zeros_like(rz))
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * ap
            z = self._precondition(r)
            rz_new = (r * z).sum(1)
            beta = torch.where(active, rz_new / rz, torch.zeros_like(rz))
            p = torch.where(active[:, None], z + beta[:, None] * p, p)
            rz = torch.where(active, rz_new, rz)
            history.append(r.norm(dim=1) / norm_b)
            if self.callback is not None:
                self.callback(len(history) - 1, unflatten(x.clone(), self.ggn.shapes))
        info = CGInfo(torch.stack(history), products, len(history) - 1)
        like = next(iter(v.values()))
        return unflatten(x.to(like), self.ggn.shapes), info

    def ihvp(self, v: LayerGrads) -> LayerGrads:
        out, self.info = self.solve(v)
        return out


def lissa_depth(rate: float, tol: float) -> int:
    """Steps J for LiSSA's bound rate^(J+1) <= tol, with rate = 1 - lambda_min(A) / s."""
    if not 0 <= rate < 1:
        raise ValueError(f"LiSSA converges only if 0 <= 1 - lambda_min/s < 1, got {rate}")
    return max(0, math.ceil(math.log(tol) / math.log(rate)) - 1) if rate > 0 else 0


def largest_eigenvalue(ggn: GGN, iters: int = 50, seed: int = 0, batches=None) -> float:
    """lambda_max(G) by power iteration (``iters`` GGN products; a lower bound that converges
    at the rate lambda_2 / lambda_1). Multiply by a margin (e.g. 1.1) for LiSSA's scale.
    ``batches``: the GGN of that subset of ``ggn.batches`` (LiSSA's minibatch products)."""
    x = torch.randn(
        1, ggn.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    value = 0.0
    for _ in range(iters):
        x = x / x.norm()
        gx = flatten(ggn.matvec(ggn.unflatten(x), batches=batches))
        value = float((x * gx).sum())  # Rayleigh quotient of the unit vector x
        x = gx
    return value
