"""The causal-LM loss every part of the project shares.

Convention: the loss of one sequence is the *sum* of next-token cross-entropies over the
tokens whose label is not ``IGNORE`` (-100). With response-only masking the prompt's labels
are ``IGNORE``, so only response tokens count. Summing (not averaging) over tokens makes a
sequence's gradient the sum of its tokens' gradients, so per-token scores add up to the
sequence's score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position, 0 where the label is IGNORE.

    logits: (B, T, V) for inputs x_0..x_{T-1}; labels: (B, T) aligned with the inputs
    (as in transformers: position t's label is the token at t, predicted from t-1).
    Returns (B, T-1): entry t is the loss of predicting labels[:, t+1].
    """
    shift_logits = logits[:, :-1].float() if logits.dtype == torch.float16 else logits[:, :-1]
    shift_labels = labels[:, 1:]
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
    return losses.view(shift_labels.shape)


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed next-token loss of each sequence over its counted tokens."""
    return token_losses(logits, labels).sum(dim=1)


def loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True at input positions whose *next* token is counted by the loss.

    Position t predicts labels[:, t+1]; the last position predicts nothing.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask
