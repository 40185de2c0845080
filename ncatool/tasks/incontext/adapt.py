"""Test-time adaptation: fine-tune an in-context NCA on its own context before it segments queries.

The in-context model reads a task from its k pairs through sums, without a gradient step: fast, and
good where the sums say enough (a structure's intensities), weak where they do not (a thin hollow
shape never seen in training, whose mask the model's learned shape prior fills). A per-task NCA
trained on the same k pairs learns such a shape, but starts from nothing. Adaptation does both: it
starts from the meta-trained weights and takes ``steps`` optimiser steps on episodes made of the
context alone, the same episodes training draws:

* each pair in turn is the query and the other k − 1 its context (leave-one-out); with k = 1 the one
  pair is its own context;
* every image is flipped at random along each axis and half of the episodes get a new contrast
  (:func:`ncatool.tasks.incontext.episodes.episode_tensors`), so a copied mask does not fit and the
  adapted model keeps reading the task from the context;
* the loss is the run's (:func:`ncatool.tasks.incontext.task.episode_loss`: its segmentation loss
  on the output plus ``aux_weight`` × BCE on the Bayes prior).

The model is copied: the meta-trained weights stay as they are, and each task gets its own copy.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ncatool.losses import make_seg_loss
from ncatool.models.incontext import InContextNCA
from ncatool.tasks.incontext.episodes import Episode, LoadedDataset, Task, episode_tensors
from ncatool.tasks.incontext.task import episode_loss

#: Learning rate of the adaptation (Adam): stage 2's default (0.2 × 2e-3) doubled.
ADAPT_LR = 1e-3
#: Episodes per adaptation step.
ADAPT_BATCH = 8


def context_dataset(images: torch.Tensor, masks: torch.Tensor) -> LoadedDataset:
    """The k context pairs as a one-task dataset: ``images (k, C, *S)``, binary ``masks (k, 1, *S)``."""
    k = images.shape[0]
    return LoadedDataset(
        root=Path("context"),
        name="context",
        images=images.float().cpu(),
        labels=(masks[:, 0] > 0.5).long().cpu(),
        label_values=[1],
        label_names={1: "task"},
        case_names=[f"context_{i}" for i in range(k)],
        records=[],
    )


def leave_one_out(k: int, rng: np.random.Generator, batch: int) -> list[Episode]:
    """``batch`` episodes over pairs ``0..k-1``: a random pair is the query, the others its context
    (the pair itself when ``k`` = 1), so every episode of the batch has ``max(1, k - 1)`` pairs."""
    episodes = []
    for _ in range(batch):
        q = int(rng.integers(k))
        context = [i for i in range(k) if i != q] or [q]
        episodes.append(Episode(Task(0, (1,)), q, context))
    return episodes


def adapt(
    model: InContextNCA,
    images: torch.Tensor,
    masks: torch.Tensor,
    steps: int,
    lr: float = ADAPT_LR,
    batch: int = ADAPT_BATCH,
    seed: int = 0,
    loss: str = "dicefocal",
    aux_weight: float = 0.5,
) -> InContextNCA:
    """A copy of ``model`` fine-tuned for ``steps`` steps on its context (see the module docstring).

    Args:
        model: The meta-trained model (left unchanged).
        images: ``(k, C, *S)`` context images at the model's working size, normalised.
        masks: ``(k, 1, *S)`` their binary masks of the task.
        steps: Optimiser steps (0: an unchanged copy).
        lr: Adam's learning rate.
        batch: Episodes per step.
        seed: Seeds the episodes, the augmentation and the NCA's fire masks.
        loss: Segmentation loss (``ncatool.losses.SEG_LOSSES``).
        aux_weight: Weight of the BCE on the Bayes prior.

    Returns:
        The adapted copy, in eval mode, on the device of ``model``.
    """
    tuned = copy.deepcopy(model)
    if steps <= 0:
        return tuned.eval()
    device = next(tuned.parameters()).device
    data = [context_dataset(images, masks)]
    rng = np.random.default_rng((seed, 31337))
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    loss_fn = make_seg_loss(loss)
    opt = torch.optim.Adam(tuned.parameters(), lr=lr)
    tuned.train()
    for _ in range(steps):
        episodes = leave_one_out(images.shape[0], rng, batch)
        query, qmask, context, cmasks = (t.to(device) for t in episode_tensors(data, episodes, rng))
        logits, bayes = tuned(query, context, cmasks)
        value, _ = episode_loss(loss_fn, logits, bayes, qmask, aux_weight)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    torch.set_rng_state(gen_state)  # the caller's draws do not depend on whether it adapted
    return tuned.eval()
