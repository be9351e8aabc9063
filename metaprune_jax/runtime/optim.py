"""Optimizers with PyTorch's semantics, and the multi-step learning-rate schedule.

The reference trains with `torch.optim.SGD(lr, momentum, weight_decay)` (nesterov off) and
meta-trains with `torch.optim.AdamW`, both under `MultiStepLR(milestones, gamma)` stepped once per
epoch. Their update rules, and the optax chains that reproduce them exactly:

* SGD (coupled decay): `g <- g + wd * p; buf <- m * buf + g` (buf = g at the first step);
  `p <- p - lr * buf`. `optax.add_decayed_weights(wd)` then `optax.sgd(lr, m)` (whose trace is
  `t <- g + m * t` from t = 0, then `-lr * t`) is the same rule; the learning rate multiplies the
  trace at update time in both, so a schedule change does not rescale the momentum buffer.
* AdamW (decoupled decay): `p <- p * (1 - lr * wd) - lr * m_hat / (sqrt(v_hat) + eps)`, which is
  `optax.adamw` (`p - lr * (adam + wd * p)`) with torch's defaults b1 0.9, b2 0.999, eps 1e-8.
* MultiStepLR by epoch: epoch e uses `lr * gamma ** #{milestones <= e}`, i.e. the step count
  boundary `milestone * steps_per_epoch` (optax's count is the 0-based index of the update).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import optax


def multistep_schedule(lr: float, milestones: Sequence[int], steps_per_epoch: int,
                       gamma: float = 0.1) -> optax.Schedule:
  """MultiStepLR over optimizer steps: lr * gamma ** (number of epoch milestones passed).

  Args:
    lr: the initial learning rate.
    milestones: epoch indices at which the rate is multiplied by `gamma`.
    steps_per_epoch: optimizer steps per epoch.
    gamma: the multiplier.
  """
  boundaries: dict[int, float] = {}
  for m in sorted(milestones):
    b = int(m) * steps_per_epoch
    boundaries[b] = boundaries.get(b, 1.0) * gamma
  return optax.piecewise_constant_schedule(lr, boundaries)


def sgd(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, weight_decay: float = 0.0,
        nesterov: bool = False) -> optax.GradientTransformation:
  """torch.optim.SGD: weight decay added to the gradient before the momentum buffer."""
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
  )


def adamw(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1e-2, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """torch.optim.AdamW (decoupled decay, torch's defaults)."""
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def make_optimizer(schedule: Mapping[str, Any], steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and learning-rate schedule described by a config schedule section.

  Args:
    schedule: a mapping (ConfigDict) with `optimizer` ('sgd' | 'adamw'), `lr`, `milestones`
      (epochs), `gamma` (default 0.1), `weight_decay`, and `momentum` (SGD).
    steps_per_epoch: optimizer steps per epoch.

  Returns:
    (tx, lr_fn): the optax transformation and the schedule (for logging).

  Raises:
    ValueError: an unknown optimizer name.
  """
  lr_fn = multistep_schedule(schedule["lr"], tuple(schedule.get("milestones", ())),
                             steps_per_epoch, schedule.get("gamma", 0.1))
  name = schedule.get("optimizer", "sgd")
  if name == "sgd":
    tx = sgd(lr_fn, schedule.get("momentum", 0.9), schedule.get("weight_decay", 0.0),
             schedule.get("nesterov", False))
  elif name == "adamw":
    tx = adamw(lr_fn, schedule.get("weight_decay", 1e-2))
  else:
    raise ValueError(f"Unknown optimizer {name!r}; known: 'sgd', 'adamw'.")
  return tx, lr_fn
