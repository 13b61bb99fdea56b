"""K-FAC and EK-FAC approximations of the Fisher, and their damped inverses.

Curvature. For each tracked layer, with G_n = sum_t g_{n,t} a_{n,t}^T the gradient of
sequence n's loss (d_out, d_in'), the Fisher is the per-sequence average

    F = (1/N) sum_n vec(G_n) vec(G_n)^T,

with the data's labels (empirical Fisher) or labels sampled from the model (true Fisher).
Scores built on it are *not* multiplied by N.

Factors. A = (1/M) sum a a^T and S = (1/M) sum g g^T average over the M non-padding tokens
of the N sequences. If tokens were independent, with a independent of g, then
F = (M/N) A (x) S: this is K-FAC, whose eigenvalues in the basis Q_A (x) Q_S of the
eigenvectors of A and S are (M/N) eig_S[o] eig_A[i]. EK-FAC keeps that basis and replaces
the eigenvalues by the diagonal of F in it (George et al. 2018), the best diagonal fit:

    Lambda[o, i] = (1/N) sum_n (Q_S^T G_n Q_A)[o, i]^2,

so both approximate the same F: F ~ (Q_A (x) Q_S) diag(Lambda) (Q_A (x) Q_S)^T.

Damped inverse. (F + lambda I)^-1 v = Q_S [(Q_S^T V Q_A) / (Lambda + lambda)] Q_A^T for each
layer's V (d_out, d_in'). ``damping`` is absolute, or with ``relative=True`` a factor of the
layer's mean eigenvalue: lambda = damping * mean(Lambda) (the default, 0.1, is the usual
heuristic). Eigendecompositions and reciprocals are in float64.

Fitting runs in stages, each saved under ``path`` when one is given (covariance -> eigens ->
correction), with optional checkpoints every ``save_every`` batches; a rerun resumes from what
is saved, after checking that the model, the data and the configuration are the same.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from influence.data import as_batches
from influence.gradients import Captured, iter_captures
from influence.io import data_fingerprint, load_tensors, model_fingerprint, save_tensors
from influence.models import resolve_layers
from influence.modules import LayerGrads, layer_shape

# captures(start, desc) yields the Captured of batches start, start + 1, ... (None for a batch
# that another process takes, see Parallel)
CaptureSource = Callable[[int, str], Iterable[Captured | None]]


@dataclasses.dataclass
class KFAC:
    """F ~ (Q_A (x) Q_S) diag(Lambda) (Q_A (x) Q_S)^T per layer, with Lambda = (M/N) eig_S eig_A^T.

    eigvecs_a: {name: (d_in', d_in')}, eigvecs_s: {name: (d_out, d_out)},
    eigenvalues: {name: (d_out, d_in')} (Lambda), all float64; meta: fit metadata.
    """

    eigvecs_a: dict[str, torch.Tensor]
    eigvecs_s: dict[str, torch.Tensor]
    eigenvalues: dict[str, torch.Tensor]
    damping: float | dict[str, float] = 0.1  # a dict: absolute, per layer (influence.damping)
    relative: bool = True  # damping = factor x the layer's mean eigenvalue
    meta: dict = dataclasses.field(default_factory=dict)

    STAGES: ClassVar[tuple[str, ...]] = ("eigens",)  # files load() reads
    MIN_RATIO: ClassVar[float] = 1e-10  # smallest damped eigenvalue / largest, at least
    MAX_RATIO: ClassVar[float] = 1e6  # damping / mean eigenvalue above which ihvp warns

    def damping_of(self, name: str) -> float:
        """The absolute damping lambda of layer ``name``."""
        if isinstance(self.damping, dict):
            if name not in self.damping:
                raise KeyError(f"the damping has no value for layer {name!r}")
            return float(self.damping[name])
        if self.relative:
            return self.damping * float(self.eigenvalues[name].mean())
        return self.damping

    def with_damping(self, damping: float | dict[str, float], relative: bool = True) -> KFAC:
        """The same factors with another damping (tensors are shared, not copied).

        A dict {layer: lambda} is absolute per layer (``influence.damping.damping`` makes one
        that every method of a comparison shares); ``relative`` then does not apply."""
        if isinstance(damping, dict):
            return dataclasses.replace(self, damping=dict(damping), relative=False)
        return dataclasses.replace(self, damping=damping, relative=relative)

    def ihvp(self, v: LayerGrads) -> LayerGrads:
        """(F + lambda I)^-1 v per layer: {name: (Q, d_out, d_in')} -> same shapes and dtypes.

        Guards, per layer: NaN/inf in its factors, or a non-finite damping, is an error; so is
        a damping that leaves the damped eigenvalues Lambda + lambda spanning more than
        1/``MIN_RATIO`` = 1e10 (a damping below 1e-10 x the largest eigenvalue on a layer
        whose eigenvalues reach ~0; an undamped well-conditioned layer passes) or any of them
        <= 0. A damping above ``MAX_RATIO`` = 1e6 x the mean eigenvalue warns: the iHVP is then
        ~ v / lambda, scores gradient dot products / lambda.
        """
        out, swamped = {}, []
        for name, mat in v.items():
            if name not in self.eigenvalues:
                raise KeyError(
                    f"layer {name!r} has no fitted factors; fitted: {list(self.eigenvalues)}"
                )
            self._check_finite([name])
            lam = self._checked_damping(name)
            values = self.eigenvalues[name]
            if lam > self.MAX_RATIO * float(values.mean()):
                swamped.append((name, lam / float(values.mean())))
            qa, qs = self.eigvecs_a[name], self.eigvecs_s[name]
            rotated = qs.T @ mat.to(qa) @ qa  # (Q, d_out, d_in') in the eigenbasis
            rotated = rotated / (values + lam)  # (d_out, d_in') damped eigenvalues, float64
            out[name] = (qs @ rotated @ qa.T).to(mat.dtype)
        if swamped:
            name, ratio = swamped[0]
            warnings.warn(
                f"the damping of layers {[n for n, _ in swamped]} is more than "
                f"{self.MAX_RATIO:.0e} x their mean eigenvalue ({ratio:.1e} x for {name!r}): "
                "(F + damping I)^-1 ~ I / damping there, so scores are gradient dot products "
                "/ damping",
                stacklevel=2,
            )
        return out

    def _checked_damping(self, name: str) -> float:
        """The absolute damping of layer ``name``, refused when non-finite or when it leaves
        the damped eigenvalues <= 0 or spanning more than 1 / MIN_RATIO."""
        lam = self.damping_of(name)
        if isinstance(self.damping, dict):
            what = f"damping {lam!r} (absolute, per layer)"
        else:
            what = f"damping {self.damping!r}" + (
                f" (relative: {lam:.3g} for this layer)" if self.relative else " (absolute)"
            )
        use = "e.g. with_damping(0.1) (0.1 x each layer's mean eigenvalue)"
        if not math.isfinite(lam):
            raise ValueError(f"layer {name!r}: {what} is not finite; use a finite damping, {use}")
        values = self.eigenvalues[name]
        low, top = float(values.min()), float(values.max())
        floor = self.MIN_RATIO * max(top, 0.0)
        if low + lam <= 0:
            curvature = "is 0 (no gradient reached it?)" if top == 0 else f"has {low:.3g}"
            raise ValueError(
                f"layer {name!r}: a damped eigenvalue is <= 0 with {what}: the layer's smallest "
                f"eigenvalue {curvature}; use a positive damping >= {floor:.3g} "
                f"({self.MIN_RATIO:.0e} x the largest eigenvalue {top:.3g}), {use}"
            )
        if low + lam < self.MIN_RATIO * (top + lam):
            share = lam / top if top > 0 else math.inf
            raise ValueError(
                f"layer {name!r}: {what} is {share:.1e} of the layer's largest eigenvalue "
                f"({top:.3g}) and its smallest is {low:.3g}, so the damped eigenvalues span more "
                f"than {1 / self.MIN_RATIO:.0e} and the iHVP of the near-null directions is "
                f"round-off x {1 / (low + lam):.1e}; use a damping >= {floor:.3g} "
                f"({self.MIN_RATIO:.0e} x the largest eigenvalue), {use}"
            )
        return lam

    def _check_finite(self, names: Iterable[str] | None = None) -> None:
        """NaN/inf in the factors of the named layers (default all) is a ValueError naming them."""
        bad = []
        for name in self.eigenvalues if names is None else names:
            parts = {
                "eigenvalues": self.eigenvalues[name],
                "eigenvectors of A": self.eigvecs_a[name],
                "eigenvectors of S": self.eigvecs_s[name],
            }
            for part, t in parts.items():
                count = int((~t.isfinite()).sum())
                if count:
                    bad.append(f"{name!r} ({part}: {count} of {t.numel()} entries)")
        if bad:
            raise ValueError(
                f"the {type(self).__name__} factors of layers {bad} contain NaN/inf: the fit saw "
                "non-finite gradients (check the model's weights and the data) or the saved "
                "factors are damaged; fit again"
            )

    def dense(self, name: str) -> torch.Tensor:
        """The approximate Fisher block (P, P) of a layer, P = d_out d_in', in the row-major
        order of ``modules.flatten`` (for tests and small-model comparisons)."""
        basis = torch.kron(self.eigvecs_s[name], self.eigvecs_a[name])
        return basis @ torch.diag(self.eigenvalues[name].reshape(-1)) @ basis.T

    def to(self, device: torch.device | str) -> KFAC:
        def move(tensors: dict) -> dict:
            return {k: t.to(device) for k, t in tensors.items()}

        return dataclasses.replace(
            self,
            eigvecs_a=move(self.eigvecs_a),
            eigvecs_s=move(self.eigvecs_s),
            eigenvalues=move(self.eigenvalues),
        )

    @classmethod
    def from_stages(cls, eigens: dict, correction: dict | None, **kwargs) -> KFAC:
        names = [k[len("QA/") :] for k in eigens if k.startswith("QA/")]
        scale = int(eigens["tokens"]) / int(eigens["examples"])  # M / N
        eigenvalues = {
            n: scale * torch.outer(eigens[f"eS/{n}"].clamp(min=0), eigens[f"eA/{n}"].clamp(min=0))
            for n in names
        }
        counts = {"examples": int(eigens["examples"]), "tokens": int(eigens["tokens"])}
        kwargs["meta"] = {**kwargs.get("meta", {}), **counts}
        fitted = cls(
            eigvecs_a={n: eigens[f"QA/{n}"] for n in names},
            eigvecs_s={n: eigens[f"QS/{n}"] for n in names},
            eigenvalues=eigenvalues,
            **kwargs,
        )
        fitted._check_finite()
        return fitted

    @classmethod
    def load(cls, path, model=None, layers=None, damping=0.1, relative=True, **expected):
        """Factors saved in folder ``path``; with ``model`` (and ``layers``), check that they
        were fitted on this model; ``expected`` checks other metadata (e.g. fisher="true")."""
        path = Path(path)
        if model is not None:
            layers = resolve_layers(model, layers)
            expected["fingerprint"] = model_fingerprint(model, layers)
        stages = {}
        for stage in cls.STAGES:
            if not (path / f"{stage}.safetensors").exists():
                raise FileNotFoundError(
                    f"no {stage}.safetensors in {path}: fit {cls.__name__} there first"
                )
            stages[stage], meta = load_tensors(path / f"{stage}.safetensors", expected)
        meta.pop("stage", None)
        try:
            return cls.from_stages(
                stages["eigens"],
                stages.get("correction"),
                damping=damping,
                relative=relative,
                meta=meta,
            )
        except ValueError as err:  # NaN/inf factors: say which files
            raise ValueError(f"{path}: {err}") from None


class EKFAC(KFAC):
    """K-FAC's eigenbasis with corrected eigenvalues Lambda = (1/N) sum_n (Q_S^T G_n Q_A)^2."""

    STAGES: ClassVar[tuple[str, ...]] = ("eigens", "correction")

    @classmethod
    def from_stages(cls, eigens: dict, correction: dict | None, **kwargs) -> EKFAC:
        base = KFAC.from_stages(eigens, None, **kwargs)
        n = float(correction["examples"])
        eigenvalues = {name: correction[f"L/{name}"] / n for name in base.eigenvalues}
        fitted = cls(
            base.eigvecs_a, base.eigvecs_s, eigenvalues, base.damping, base.relative, base.meta
        )
        fitted._check_finite()
        return fitted


# ---- fitting ---------------------------------------------------------------------------


PRODUCT_DTYPES = (torch.float64, torch.float32)


def _covariance_update(dtype: torch.dtype) -> Callable[[dict, Captured], None]:
    def update(state: dict, cap: Captured) -> None:
        mask = cap.mask
        # A caller's autocast would run the products in bf16: off, as in grads_from_pairs
        with torch.autocast(mask.device.type, enabled=False):
            for name in cap.a:
                work = torch.promote_types(cap.a[name].dtype, dtype)
                a = cap.a[name][mask].to(work)  # (M_b, d_in'), non-padding tokens only
                g = cap.g[name][mask].to(work)  # (M_b, d_out)
                state[f"A/{name}"] += a.T @ a  # summed over batches in float64
                state[f"S/{name}"] += g.T @ g
        state["tokens"] += mask.sum()
        state["examples"] += mask.shape[0]

    return update


def _correction_update(eigens: dict, dtype: torch.dtype) -> Callable[[dict, Captured], None]:
    def update(state: dict, cap: Captured) -> None:
        with torch.autocast(cap.mask.device.type, enabled=False):
            for name in cap.a:
                work = torch.promote_types(cap.a[name].dtype, dtype)
                keep = cap.mask[..., None].to(work)  # (B, T, 1)
                qa, qs = eigens[f"QA/{name}"].to(work), eigens[f"QS/{name}"].to(work)
                a = (cap.a[name].to(work) * keep) @ qa  # (B, T, d_in') Q_A^T a_t
                g = cap.g[name].to(work) @ qs  # (B, T, d_out) Q_S^T g_t
                rotated = g.mT @ a  # (B, d_out, d_in') Q_S^T G_n Q_A (bmm: faster than einsum)
                state[f"L/{name}"] += rotated.square().sum(0, dtype=torch.float64)
        state["examples"] += cap.mask.shape[0]

    return update


def _eigh_each(mats: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {key: torch.linalg.eigh(mat) for key, mat in mats.items()}


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How the processes of one fit share it (``influence.distributed`` builds one).

    Each process's capture source yields its own batches and None for the others'.
    reduce(state): sums a state dict over the processes, in place (nothing to do alone).
    eigh(mats): {key: (eigenvalues, eigenvectors)} of every symmetric matrix, on every process.
    write: whether this process writes the files under ``path`` (exactly one does).
    """

    reduce: Callable[[dict], None] = lambda state: None
    eigh: Callable[[dict], dict] = _eigh_each
    write: bool = True


ALONE = Parallel()


def _eigens(cov: dict, shapes: dict[str, tuple[int, int]], parallel: Parallel) -> dict:
    out = {"tokens": cov["tokens"], "examples": cov["examples"]}
    if int(cov["tokens"]) == 0:
        raise ValueError("the data has no non-padding token: nothing to fit")
    # A and S in place: the sums are not used again, and a copy would double their memory.
    mats = {f"{k}/{n}": cov[f"{k}/{n}"].div_(cov["tokens"]) for n in shapes for k in ("A", "S")}
    for key, (evals, evecs) in parallel.eigh(mats).items():  # float64
        out[f"e{key}"], out[f"Q{key}"] = evals, evecs
    return out


def _stage(name, path, meta, init, update, captures, save_every, device, parallel) -> dict:
    """One pass over the data, resumed from / saved to ``path`` (a folder) when given.

    With several processes, each sums its own batches and the sums are reduced at every
    checkpoint and at the end. After a checkpoint (or when resuming from one) the writer holds
    the total so far and the others start again from zero: the next sum is still the total.
    """
    meta = {**meta, "stage": name}
    final = path / f"{name}.safetensors" if path else None
    partial = path / f"{name}.partial.safetensors" if path else None
    if final is not None and final.exists():
        return {k: t.to(device) for k, t in load_tensors(final, meta)[0].items()}
    state, start = init(), 0
    if partial is not None and partial.exists():
        saved_state, saved = load_tensors(partial, meta)
        start = saved["batches_done"]
        if parallel.write:
            state = {k: t.to(device) for k, t in saved_state.items()}
    done = start
    for cap in captures(start, name) if captures is not None else ():
        if cap is not None:  # None: another process's batch
            update(state, cap)
        del cap  # not alive while the next batch is captured
        done += 1
        if save_every and partial is not None and done % save_every == 0:
            parallel.reduce(state)
            if parallel.write:
                save_tensors(partial, state, {**meta, "batches_done": done})
            else:
                state = init()
    if captures is not None:  # a pass over the data (the eigens stage is not one)
        parallel.reduce(state)
    if final is not None and parallel.write:
        save_tensors(final, state, meta)
        partial.unlink(missing_ok=True)
    return state


def fit_from_captures(
    captures: CaptureSource,
    shapes: dict[str, tuple[int, int]],
    kind: str = "ekfac",
    *,
    meta: dict | None = None,
    path: str | Path | None = None,
    save_every: int | None = None,
    damping: float = 0.1,
    relative: bool = True,
    device: torch.device | str = "cpu",
    parallel: Parallel = ALONE,
    product_dtype: torch.dtype = torch.float64,
) -> KFAC:
    """Fit K-FAC or EK-FAC from any source of (a, g, mask) batches (see ``fit_ekfac``).

    captures(start, desc) must yield the same batches, in the same order, at every call.
    parallel: how several processes share the fit (``influence.distributed``); default alone.
    """
    if kind not in ("kfac", "ekfac"):
        raise ValueError(f"kind must be 'kfac' or 'ekfac', got {kind!r}")
    if product_dtype not in PRODUCT_DTYPES:
        raise ValueError(
            f"product_dtype must be torch.float64 (default) or torch.float32, got {product_dtype!r}"
        )
    meta = {**(meta or {}), "layers": {n: list(s) for n, s in shapes.items()}}
    # None for the default, so that factors saved before the option existed still load
    meta["product_dtype"] = None if product_dtype == torch.float64 else "float32"
    path = Path(path) if path is not None else None

    def zeros(keys_shapes):
        def init():
            state = {k: torch.zeros(s, dtype=torch.float64, device=device) for k, s in keys_shapes}
            for key in ("tokens", "examples"):
                state[key] = torch.zeros((), dtype=torch.long, device=device)
            return state

        return init

    cov_init = zeros(
        [(f"A/{n}", (d_in, d_in)) for n, (_, d_in) in shapes.items()]
        + [(f"S/{n}", (d_out, d_out)) for n, (d_out, _) in shapes.items()]
    )

    def covariance_then_eigh() -> dict:
        cov = _stage(
            "covariance",
            path,
            meta,
            cov_init,
            _covariance_update(product_dtype),
            captures,
            save_every,
            device,
            parallel,
        )
        return _eigens(cov, shapes, parallel)

    # The eigens stage reads no data: it is computed (or loaded) from the covariance stage.
    eigens = _stage("eigens", path, meta, covariance_then_eigh, None, None, None, device, parallel)
    common = {"damping": damping, "relative": relative, "meta": meta}
    if kind == "kfac":
        return KFAC.from_stages(eigens, None, **common)
    cor_init = zeros([(f"L/{n}", s) for n, s in shapes.items()])
    update = _correction_update(eigens, product_dtype)
    correction = _stage(
        "correction", path, meta, cor_init, update, captures, save_every, device, parallel
    )
    return EKFAC.from_stages(eigens, correction, **common)


def _fit(kind, model, batches, *, layers, fisher, seed, shard=(0, 1), **options) -> KFAC:
    """Fit on ``batches`` (this process's ``shard`` = (rank, world) of them; see
    ``influence.distributed``); ``options`` go to ``fit_from_captures``."""
    layers = resolve_layers(model, layers)
    batches = as_batches(batches)  # one Batches: every pass is checked against the first
    meta = {
        "fingerprint": model_fingerprint(model, layers),
        "data": data_fingerprint(batches),
        "fisher": fisher,
        "seed": seed,
    }
    progress = options.pop("progress")

    def captures(start: int, desc: str) -> Iterable[Captured | None]:
        return iter_captures(
            model, layers, batches, fisher, seed, progress, desc, start, shard=shard
        )

    shapes = {name: layer_shape(m) for name, m in layers.items()}
    device = next(model.parameters()).device
    return fit_from_captures(captures, shapes, kind, meta=meta, device=device, **options)


def fit_ekfac(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    layers: dict[str, nn.Module] | None = None,
    fisher: str = "true",
    seed: int = 0,
    path: str | Path | None = None,
    save_every: int | None = None,
    progress: bool = True,
    damping: float = 0.1,
    relative: bool = True,
    product_dtype: torch.dtype = torch.float64,
) -> EKFAC:
    """EK-FAC of the per-sequence Fisher over ``batches`` (two passes over the data).

    batches: a re-iterable of batch dicts (a list, a DataLoader). layers: default
    ``find_layers(model)``. fisher: "true" (default; labels sampled from the model, seeded by
    ``seed``: an unbiased estimate of the GGN) or "empirical" (the data's labels). path: a folder where stages are saved and resumed from;
    save_every: also checkpoint every so many batches within a pass. ``batches`` must give
    the same batches in the same order at every pass (no reshuffling between passes).
    product_dtype: dtype of each batch's products (the covariances' a^T a and g^T g, the
    correction's rotations Q_S^T G_n Q_A and their squares), at least the model's; their sums
    over batches are float64 either way. torch.float32 makes the fit 1.4x faster on CPU
    (``make bench``; GPUs run float64 products at a fraction of float32's rate) at float32
    round-off in each batch's statistics (kronfluence's default precision; the bench's scores
    moved by 4e-7 relative); default float64.
    """
    return _fit(
        "ekfac",
        model,
        batches,
        layers=layers,
        fisher=fisher,
        seed=seed,
        path=path,
        save_every=save_every,
        progress=progress,
        damping=damping,
        relative=relative,
        product_dtype=product_dtype,
    )


def fit_kfac(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    layers: dict[str, nn.Module] | None = None,
    fisher: str = "true",
    seed: int = 0,
    path: str | Path | None = None,
    save_every: int | None = None,
    progress: bool = True,
    damping: float = 0.1,
    relative: bool = True,
    product_dtype: torch.dtype = torch.float64,
) -> KFAC:
    """K-FAC, F ~ (M/N) A (x) S (one pass over the data); arguments as in ``fit_ekfac``."""
    return _fit(
        "kfac",
        model,
        batches,
        layers=layers,
        fisher=fisher,
        seed=seed,
        path=path,
        save_every=save_every,
        progress=progress,
        damping=damping,
        relative=relative,
        product_dtype=product_dtype,
    )
