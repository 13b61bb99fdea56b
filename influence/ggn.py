"""The exact Gauss-Newton matrix (GGN) of the tracked layers: matrix-free products and oracles.

Let theta be the tracked layers' weights in canonical layout (``influence.modules``; P entries
in ``flatten`` order), everything else frozen. Sequence n has logits z_{n,t} = f_t(x_n; theta)
and loss L_n = sum over counted t of CE(z_{n,t}, y_{n,t}) (``influence.lm``). The GGN,
averaged per sequence, is

    G = (1/N) sum_n sum_{counted t} J_{n,t}^T (diag(p) - p p^T) J_{n,t},

with p = softmax(z_{n,t}) and J_{n,t} = dz_{n,t}/dtheta, shape (V, P). For cross-entropy
diag(p) - p p^T is the covariance of dCE/dz = p - e_y under y ~ p, so G is also the true
Fisher (1/N) sum_n E_y[g_n g_n^T] with each counted label drawn from the model (the cross
terms between tokens vanish: each has mean 0). EK-FAC estimates this matrix by sampling
labels. The empirical Fisher (1/N) sum_n g_n g_n^T uses the data's labels instead. G differs
from the Hessian of (1/N) sum_n L_n only by the term sum_k dL/dz_k d2z_k/dtheta2, which is 0
when the logits are linear in theta.

The model should be in eval mode with dropout off: every product re-runs its forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from influence.data import Batch
from influence.gradients import sample_labels
from influence.lm import loss_mask, sequence_losses
from influence.modules import LayerGrads, canonical_weight, flatten, layer_shape, to_native
from influence.modules import unflatten as _unflatten


class GGN:
    """Exact GGN of ``layers`` on ``batches``, averaged over their N sequences.

    ``matvec(v)`` never forms G: per batch, a Jacobian-vector product gives J v, the softmax
    Hessian is applied at the counted positions, and a vjp gives J^T (H J v). ``dense()`` is
    the float64 oracle for small parameter sets. The tracked weights are copied when the
    object is built: build it on the trained model. ``chunk``: vectors per vmapped product
    (memory grows as chunk x B x T x V).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        batches: Batch | Iterable[Batch],
        chunk: int = 64,
    ):
        if not layers:
            raise ValueError("layers is empty: pass influence.modules.find_layers(model, ...)")
        self.model, self.layers, self.chunk = model, layers, chunk
        self.batches = [batches] if isinstance(batches, dict) else list(batches)
        if not self.batches:
            raise ValueError("batches is empty: the GGN needs at least one batch")
        self.num_sequences = sum(b["input_ids"].shape[0] for b in self.batches)
        self.shapes = {name: layer_shape(m) for name, m in layers.items()}
        self.num_params = sum(o * i for o, i in self.shapes.values())
        self.params = {name: canonical_weight(m).detach().clone() for name, m in layers.items()}
        self.dtype = next(iter(self.params.values())).dtype
        self.device = next(iter(self.params.values())).device
        # Every other parameter enters detached, so no autograd graph is built through them.
        self._frozen = {k: p.detach() for k, p in model.named_parameters()}
        self._last: tuple | None = None  # (batch, its linear maps): see _maps

    # ---- the function theta -> logits ----------------------------------------------------

    def logits_fn(self, batch: Batch) -> Callable[[LayerGrads], torch.Tensor]:
        """theta (canonical {name: (d_out, d_in')}) -> logits (B, T, V) on ``batch``."""
        inputs = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

        def logits(params: LayerGrads) -> torch.Tensor:
            native = {
                f"{name}.{key}": value
                for name, mat in params.items()
                for key, value in to_native(self.layers[name], mat).items()
            }
            # The fused attention kernels have no second derivative (J v below is a vjp of a
            # vjp); the math kernel computes the same attention from differentiable primitives.
            with sdpa_kernel(SDPBackend.MATH):
                out = functional_call(self.model, {**self._frozen, **native}, (), inputs)
            return out.logits if hasattr(out, "logits") else out

        return logits

    def _linear_maps(self, batch: Batch):
        """logits (B, T, V), v -> J v and u -> J^T u on ``batch``, from one forward pass.

        J v is the transpose of the linear map u -> J^T u, so it is the vjp of the vjp
        (reverse over reverse): faster than forward mode here, and it needs no forward-mode
        derivatives of the model's operations.
        """
        logits, vjp_fn = vjp(self.logits_fn(batch), self.params)
        _, transpose_fn = vjp(vjp_fn, torch.zeros_like(logits))

        def jvp_fn(tangent: LayerGrads) -> torch.Tensor:
            return transpose_fn((tangent,))[0]

        return logits.detach(), jvp_fn, vjp_fn

    def _maps(self, batch: Batch):
        """``_linear_maps(batch)``, kept while the same batch object comes back: a power
        iteration or LiSSA step on one minibatch then runs the forward pass and builds the
        transpose graph once, not at every product (64% of a product's time on a LoRA model
        of the zoo). Same numbers: the maps are deterministic functions of the batch and of
        weights a GGN takes as fixed (build it on the trained model). One batch's graph is held
        at a time."""
        if self._last is None or self._last[0] is not batch:
            self._last = None  # free the previous graph before building the next
            self._last = (batch, self._linear_maps(batch))
        return self._last[1]

    def unflatten(self, vec: torch.Tensor) -> LayerGrads:
        """(..., P) -> {name: (..., d_out, d_in')} in this GGN's layer order."""
        return _unflatten(vec, self.shapes)

    def _check(self, v: LayerGrads) -> None:
        if set(v) != set(self.shapes):
            raise ValueError(
                f"v has layers {sorted(v)}, the GGN tracks {sorted(self.shapes)}; "
                "pass one (Q, d_out, d_in') tensor per tracked layer"
            )
        for name, shape in self.shapes.items():
            if v[name].dim() != 3 or tuple(v[name].shape[1:]) != shape:
                raise ValueError(
                    f"v[{name!r}] has shape {tuple(v[name].shape)}, expected (Q, {shape[0]}, "
                    f"{shape[1]}): add a leading query dimension"
                )

    # ---- matrix-free products -------------------------------------------------------------

    def matvec(self, v: LayerGrads, batches: list[Batch] | None = None) -> LayerGrads:
        """G v for Q vectors at once: {name: (Q, d_out, d_in')} -> same shapes and dtype.

        ``batches`` (default: all of this GGN's batches) gives the GGN of a subset, averaged
        over that subset's sequences: a stochastic estimate for LiSSA.
        """
        self._check(v)
        batches = self.batches if batches is None else batches
        dtype = next(iter(v.values())).dtype
        v = {name: v[name].to(self.dtype) for name in self.shapes}  # dict order = layers order
        out = {name: torch.zeros_like(x) for name, x in v.items()}
        for batch in batches:
            logits, jvp_fn, vjp_fn = self._maps(batch)
            p = torch.softmax(logits, dim=-1)  # (B, T, V)
            mask = loss_mask(batch["labels"].to(self.device))[..., None]  # (B, T, 1)
            q = next(iter(v.values())).shape[0]
            for start in range(0, q, self.chunk):
                jv = vmap(jvp_fn)({n: x[start : start + self.chunk] for n, x in v.items()})
                hjv = p * jv - p * (p * jv).sum(-1, keepdim=True)  # softmax Hessian (c,B,T,V)
                (jthjv,) = vmap(vjp_fn)(hjv * mask)
                for name in out:
                    out[name][start : start + self.chunk] += jthjv[name]
        n = sum(b["input_ids"].shape[0] for b in batches)
        return {name: (x / n).to(dtype) for name, x in out.items()}

    # ---- dense oracles (float64) ----------------------------------------------------------

    def _scaled_jacobian(self, batch: Batch) -> torch.Tensor:
        """A = J^T M of every counted position of ``batch``, flattened: (P, K*V), float64.

        M = (I - p 1^T) diag(sqrt p) is a square root of the softmax Hessian (M M^T =
        diag(p) - p p^T, using 1^T p = 1), so sum_t J_t^T H_t J_t = A A^T. Entrywise
        A[:, t, j] = sqrt(p_tj) (J_t[j] - sum_i p_ti J_t[i]). P Jacobian-vector products.
        """
        logits, jvp_fn, _ = self._linear_maps(batch)
        mask = loss_mask(batch["labels"].to(self.device))  # (B, T)
        p = torch.softmax(logits, dim=-1)[mask].double()  # (K, V)
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        cols = []
        for start in range(0, self.num_params, self.chunk):
            jac = vmap(jvp_fn)(self.unflatten(eye[start : start + self.chunk]))  # (c, B, T, V)
            jac = jac[:, mask].double()  # (c, K, V)
            centred = jac - (jac * p).sum(-1, keepdim=True)
            cols.append((centred * p.sqrt()).flatten(1))  # (c, K*V)
        return torch.cat(cols)

    def _head(self) -> nn.Linear:
        """The LM head, checked to be what the reverse mode assumes: logits = W h."""
        head = (
            self.model.get_output_embeddings()
            if hasattr(self.model, "get_output_embeddings")
            else None
        )
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ValueError(
                f"mode='reverse' needs a bias-free nn.Linear LM head (get_output_embeddings()), "
                f"got {type(head).__name__}: use mode='forward'"
            )
        if any(m is head for m in self.layers.values()):
            raise ValueError("mode='reverse' needs an untracked LM head: use mode='forward'")
        return head

    def _scaled_jacobian_reverse(self, batch: Batch) -> torch.Tensor:
        """A with A A^T = sum_t J_t^T H_t J_t, by reverse mode: (P, K*d), float64.

        With the LM head z_t = W h_t (W: (V, d), h_t the last hidden state), J_t = W J^h_t and
        J_t^T H_t J_t = (J^h_t)^T C_t J^h_t with C_t = W^T H_t W = L_t L_t^T (d, d; eigh).
        Column (t, j) of A is the gradient of L_t[:, j] . h_t. Sequences do not interact, so
        one backward pass gives it for one (t, j) of every sequence at once: the gradient of
        each tracked layer is sum_s g_s a_s^T per sequence, from its inputs a_s and the
        gradients g_s at its outputs. Cost: max_n K_n * d backward passes over the batch
        (K_n counted positions of sequence n; vmapped in chunks of ``chunk``), against P
        Jacobian-vector products in forward mode: cheaper when K_n * d < P.
        """
        head = self._head()
        native = {
            f"{name}.{key}": value
            for name, mat in self.params.items()
            for key, value in to_native(self.layers[name], mat).items()
        }
        probes, acts, hidden = {}, {}, {}

        def tracked_hook(name):
            def hook(module, inputs, output):
                a = inputs[0].detach()
                if module.bias is not None:
                    a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
                acts[name] = a  # (B, T, d_in')
                # d/d(probe) = d/d(output); the probe keeps every path downstream of it.
                probes[name] = torch.zeros_like(output, requires_grad=True)
                return output + probes[name]

            return hook

        handles = [m.register_forward_hook(tracked_hook(n)) for n, m in self.layers.items()]
        handles.append(head.register_forward_hook(lambda m, i, o: hidden.update(h=i[0], z=o)))
        inputs = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}
        try:
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                out = functional_call(self.model, {**self._frozen, **native}, (), inputs)
        finally:
            for handle in handles:
                handle.remove()
        logits = out.logits if hasattr(out, "logits") else out
        h = hidden["h"]  # (B, T, d)
        if logits.shape != hidden["z"].shape or not torch.equal(logits, hidden["z"]):
            raise ValueError(
                "the logits are not the LM head's output (e.g. Gemma-2's final logit "
                "softcapping, tanh(z / c) c): use mode='forward'"
            )
        mask = loss_mask(batch["labels"].to(self.device))  # (B, T)
        p = torch.softmax(logits.detach()[mask].double(), dim=-1)  # (K, V)
        w = head.weight.detach().double()  # (V, d)
        wp = p @ w  # (K, d)
        c = torch.einsum("vd,kv,ve->kde", w, p, w) - wp[:, :, None] * wp[:, None, :]
        e, u = torch.linalg.eigh(c)  # C_t = L_t L_t^T with L_t = U diag(sqrt e)
        roots = (u * e.clamp(min=0).sqrt()[:, None, :]).to(h.dtype)  # (K, d, d), columns j
        # slot[b, i]: the i-th counted position of sequence b (as an index into the K rows).
        b_idx, t_idx = mask.nonzero(as_tuple=True)  # (K,), (K,), sorted by b then t
        counts = mask.sum(1)  # (B,)
        local = torch.arange(len(b_idx), device=self.device) - (counts.cumsum(0) - counts)[b_idx]
        d, names = h.shape[-1], list(self.layers)
        cols = []
        for start in range(0, int(counts.max()) * d, self.chunk):
            rounds = torch.arange(start, min(start + self.chunk, int(counts.max()) * d))
            r, k = torch.nonzero(local[None, :] == (rounds // d)[:, None], as_tuple=True)
            j = (rounds % d)[r]  # (R,) hidden direction of each (round, position) pair
            cot = torch.zeros(len(rounds), *h.shape, dtype=h.dtype, device=self.device)
            cot[r, b_idx[k], t_idx[k]] = roots[k, :, j]
            grads = torch.autograd.grad(
                h, [probes[n] for n in names], cot, retain_graph=True, is_grads_batched=True
            )  # {(c, B, T, d_out)}
            # reshape: a layer run on the flattened (B*T, d) tokens (OPT's MLP) as (B, T, d)
            per_seq = [
                torch.einsum(
                    "cbto,bti->cboi",
                    g.reshape(len(g), *h.shape[:2], -1),
                    acts[n].reshape(*h.shape[:2], -1),
                ).flatten(2)
                for n, g in zip(names, grads, strict=True)
            ]
            cols.append(torch.cat(per_seq, dim=-1)[r, b_idx[k]].double())  # (R, P)
        return torch.cat(cols).T

    def dense(self, mode: str = "forward") -> torch.Tensor:
        """G as a dense (P, P) float64 matrix: the oracle for small parameter sets.

        mode "forward", per batch: P Jacobian-vector products (in chunks of ``chunk``), memory
        P*K*V for the Jacobian of its K counted positions, a (P x KV) @ (KV x P) product.
        mode "reverse" (``_scaled_jacobian_reverse``): max_n K_n * d backward passes, memory
        P*K*d, a (P x Kd) @ (Kd x P) product; needs a linear, untracked LM head. Both are
        exact to float64 rounding when the model computes in float64; use them for P up to
        a few thousand.
        """
        out = torch.zeros(self.num_params, self.num_params, dtype=torch.float64)
        for batch in self.batches:
            a = self.jacobian(batch, mode).cpu()
            out += a @ a.T
        return out / self.num_sequences

    def jacobian(self, batch: Batch, mode: str = "forward") -> torch.Tensor:
        """A (P, K*V or K*d) with A A^T = sum over the batch's sequences of J^T H J: the
        batch's GGN sum, as a factor (``mode`` as in ``dense``). Its rank is at most its
        width, so a GGN wider than its data can be inverted on the small side."""
        if mode == "forward":
            return self._scaled_jacobian(batch)
        if mode == "reverse":
            return self._scaled_jacobian_reverse(batch)
        raise ValueError(f"mode must be 'forward' or 'reverse', got {mode!r}")

    def trace(self, mode: str = "forward") -> dict[str, float]:
        """tr(G_ll) of each layer's diagonal block (exact; same cost as ``dense``, less memory)."""
        total = torch.zeros(self.num_params, dtype=torch.float64)
        for batch in self.batches:
            total += self.jacobian(batch, mode).pow(2).sum(1).cpu()
        parts = self.unflatten(total / self.num_sequences)
        return {name: float(x.sum()) for name, x in parts.items()}

    def sequence_grads(self, batch: Batch, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sequence gradients dL_n/dtheta, flattened: (B, P), in the model's dtype.

        ``labels`` (B, T) replaces the batch's labels (e.g. labels sampled from the model).
        """
        labels = (batch["labels"] if labels is None else labels).to(self.device)
        f = self.logits_fn(batch)
        losses, vjp_fn = vjp(lambda params: sequence_losses(f(params), labels), self.params)
        eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=self.device)
        (grads,) = vmap(vjp_fn)(eye)  # one vjp per sequence: {name: (B, d_out, d_in')}
        return flatten({name: grads[name] for name in self.shapes})

    def sample_labels(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """(B, T) labels drawn from the model at the counted positions, -100 elsewhere."""
        with torch.no_grad():
            logits = self.logits_fn(batch)(self.params)
        return sample_labels(logits, batch["labels"].to(self.device), generator)

    def empirical_fisher_dense(self) -> torch.Tensor:
        """(1/N) sum_n g_n g_n^T with the data's labels: (P, P) float64."""
        out = torch.zeros(self.num_params, self.num_params, dtype=torch.float64)
        for batch in self.batches:
            g = self.sequence_grads(batch).double().cpu()
            out += g.T @ g
        return out / self.num_sequences

    def sampled_fisher_dense(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Monte-Carlo true Fisher (1/(N S)) sum_n sum_s g_n(y_s) g_n(y_s)^T: (P, P) float64.

        Each counted label is drawn from the model; as num_samples grows this tends to ``dense``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        out = torch.zeros(self.num_params, self.num_params, dtype=torch.float64)
        for batch in self.batches:
            for _ in range(num_samples):
                g = self.sequence_grads(batch, self.sample_labels(batch, generator))
                g = g.double().cpu()
                out += g.T @ g
        return out / (self.num_sequences * num_samples)


class DenseGGN:
    """A GGN held as dense float64 matrices, one per batch; products are matrix multiplies.

    Same interface as ``GGN`` for the solvers (``matvec`` with an optional subset of
    ``batches``, ``dense``, ``trace``, ``shapes``, ``unflatten``) and the same products to
    float64 rounding, at a cost of P^2 memory per batch. For small P, to run iterative solvers
    for many steps (LiSSA, CG) or with several dampings on one GGN. ``mode``: as in
    ``GGN.dense``.
    """

    def __init__(self, ggn: GGN, mode: str = "forward"):
        self.shapes, self.batches = ggn.shapes, ggn.batches
        self.num_params, self.num_sequences = ggn.num_params, ggn.num_sequences
        self.dtype, self.device = torch.float64, torch.device("cpu")
        self.sums = []  # per batch: sum over its sequences of J^T H J, (P, P)
        for batch in self.batches:
            a = ggn.jacobian(batch, mode).cpu()
            self.sums.append(a @ a.T)
        self._index = {id(b): i for i, b in enumerate(self.batches)}
        self._total = sum(self.sums)

    def unflatten(self, vec: torch.Tensor) -> LayerGrads:
        return _unflatten(vec, self.shapes)

    def dense(self) -> torch.Tensor:
        """G (P, P), float64."""
        return self._total / self.num_sequences

    def trace(self) -> dict[str, float]:
        parts = self.unflatten(torch.diagonal(self.dense()))
        return {name: float(x.sum()) for name, x in parts.items()}

    def matvec(self, v: LayerGrads, batches: list[Batch] | None = None) -> LayerGrads:
        """G v (or the GGN of a subset of this GGN's ``batches``), as ``GGN.matvec``."""
        if set(v) != set(self.shapes):
            raise ValueError(f"v has layers {sorted(v)}, the GGN tracks {sorted(self.shapes)}")
        batches = self.batches if batches is None else batches
        unknown = [i for i, b in enumerate(batches) if id(b) not in self._index]
        if unknown:
            raise ValueError(f"batches {unknown} are not among this GGN's batches")
        chosen = [self._index[id(b)] for b in batches]
        n = sum(self.batches[i]["input_ids"].shape[0] for i in chosen)
        x = flatten({name: v[name] for name in self.shapes}).double()  # (Q, P)
        if sorted(chosen) == list(range(len(self.batches))):
            out = x @ self._total / n  # every batch once: the cached sum
        else:  # a product per batch: no P x P temporary (LiSSA's minibatches)
            out = sum(x @ self.sums[i] for i in chosen) / n
        return self.unflatten(out.to(v[next(iter(self.shapes))].dtype))


def ggn_vector_product(
    model: nn.Module, layers: dict[str, nn.Module], batches: Batch | Iterable[Batch], v: LayerGrads
) -> LayerGrads:
    """G v (see ``GGN.matvec``) without keeping a GGN object around."""
    return GGN(model, layers, batches).matvec(v)
