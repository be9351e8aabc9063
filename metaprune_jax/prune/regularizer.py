"""The DepGraph group-norm regulariser of meta-training (docs/design.md section 5).

``R = reg / 2 * sum_g sum_c gamma_g[c] * ||w_{g,c}||^2`` over every slice of channel ``c`` of
group ``g`` (conv/dense output rows, consumers' input columns, BatchNorm scales; with
``bias=True`` also conv/dense/BatchNorm biases), with ``gamma_g = alpha ** ((max imp - imp) /
(max imp - min imp))``, ``imp = sqrt(normalised group importance)`` and no gradient through
``gamma``. Its gradient, ``reg * gamma * w`` on each slice, is exactly what the reference's
``GroupNormPruner.regularize`` adds to ``.grad`` (a weight in two groups gets both terms).

On a masked full-width network (``masks`` given) importance, ``max``/``min`` and the
"ignore a group with exactly ``num_classes`` channels" rule use the kept channels only, so the
value equals that of the materialised network.

Degenerate groups: a group whose importance has a NaN is skipped, as in the reference. Where
``max imp == min imp`` (one channel, or all equal) the reference divides 0 by 0, gets NaN
``gamma`` and then silently drops every parameter tensor whose regulariser gradient contains a
NaN; we set ``gamma = 1`` for such a group instead (its channels are equally important, so
none is pushed harder), which keeps every other group's contribution.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from metaprune_jax.nets.arch import Arch
from metaprune_jax.prune import groups as groups_lib


def group_gammas(arch: Arch, params: Mapping, alpha: float = 16.0, normalizer: str = "max",
                 masks: Mapping | None = None) -> list:
  """Per-group ``gamma [width]`` (constants: gradients stopped). NaN groups give zeros."""
  out = []
  for g in _groups(arch, masks):
    raw = jax.lax.stop_gradient(groups_lib.raw_group_importance(arch, params, g))
    keep = None if masks is None or g.space not in masks else masks[g.space] > 0
    if keep is not None and normalizer == "max":
      imp = raw / jnp.max(jnp.where(keep, raw, -jnp.inf))
    elif keep is not None and normalizer == "mean":
      imp = raw / (jnp.sum(jnp.where(keep, raw, 0)) / jnp.sum(keep))
    else:
      imp = groups_lib.normalize(raw, normalizer)
    imp = jnp.sqrt(imp)
    if keep is None:
      hi, lo = jnp.max(imp), jnp.min(imp)
    else:
      hi = jnp.max(jnp.where(keep, imp, -jnp.inf))
      lo = jnp.min(jnp.where(keep, imp, jnp.inf))
    span = hi - lo
    gamma = jnp.where(span > 0, alpha ** ((hi - imp) / jnp.where(span > 0, span, 1.0)), 1.0)
    gamma = jnp.where(jnp.any(jnp.isnan(imp)), 0.0, gamma)
    if keep is not None:
      gamma = jnp.where(keep, gamma, 0.0)
      # a group pruned to exactly num_classes channels is ignored, as in the materialised net
      gamma = jnp.where(groups_lib.kept_as_group(arch, g, masks), gamma, 0.0)
    out.append(jax.lax.stop_gradient(gamma))
  return out


def _groups(arch, masks):
  """Masked (embedded) networks decide the num_classes rule from their kept counts."""
  return groups_lib.pruning_groups(arch, ignore_classes=masks is None)


FORMS = ("absolute", "relative", "share:Q")


def parse_form(form: str) -> tuple[str, float]:
  """``(kind, q)`` of a regulariser form name; ``q`` is the share of ``share:Q`` (else 0).

  Raises:
    ValueError: an unknown form, or a share outside (0, 1).
  """
  if form in ("absolute", "relative"):
    return form, 0.0
  if isinstance(form, str) and form.startswith("share:"):
    try:
      q = float(form.split(":", 1)[1])
    except ValueError:
      q = float("nan")
    if 0.0 < q < 1.0:
      return "share", q
    raise ValueError(f"regulariser form {form!r}: the share must be a number in (0, 1)")
  raise ValueError(f"unknown regulariser form {form!r}; choose from {FORMS}")


def regularizer(arch: Arch, variables: Mapping, alpha: float = 16.0, reg: float = 10.0,
                normalizer: str = "max", bias: bool = False,
                masks: Mapping | None = None, form: str = "absolute") -> jax.Array:
  """The group-norm regulariser value (scalar); differentiate it w.r.t. ``variables['params']``.

  Args:
    arch: architecture.
    variables: ``{'params', ...}`` (or a bare params tree).
    alpha: gamma's base (16 in the paper).
    reg: strength (10).
    normalizer: importance normaliser before the square root (``max``).
    bias: also regularise biases (the reference's ``bias=False`` by default).
    masks: optional ``{space: [width] float}`` channel masks of a masked full-width network
      (pruned channels excluded from max/min and from R).
    form: ``absolute``, DepGraph's and the reference's ``reg / 2 * sum_g sum_c gamma_c s_c``
      with ``s_c`` channel ``c``'s summed squares over the group's members; or ``relative``,
      ``reg * sum_g (sum_c gamma_c s_c) / (sum_c s_c)``: a gamma-weighted mean per group,
      unchanged when a group's weights are scaled uniformly, so its gradient
      ``2 reg w (gamma_c - R_g) / sum_c s_c`` only moves norm from the less to the more
      important channels of a group (a polarisation objective for meta-training; see
      docs/recipe_search.md); or ``share:Q`` (``0 < Q < 1``), ``reg * sum_g (sum over the group's
      least important Q share of channels of s_c) / sg(sum_c s_c)`` (``sg``: no gradient): it
      pushes only those channels, towards zero, and is 0 once they are, so its optimum keeps the
      rest of the group free (a target share instead of the relative form's all-in-one-channel
      optimum). The share is of the kept channels, ranked by normalised importance.

  Returns:
    ``[]`` float32 scalar. Jittable (``arch`` static).

  Raises:
    ValueError: an unknown normalizer or form.
  """
  kind, q = parse_form(form)
  params = variables["params"] if "params" in variables else variables
  gammas = group_gammas(arch, params, alpha, normalizer, masks)
  total = jnp.float32(0.0)
  for g, gamma in zip(_groups(arch, masks), gammas):
    per_channel = 0.0
    for m in g.members:
      p = params[m.layer]
      if m.kind == "bn":
        sq = jnp.square(p["scale"])
        if bias:
          sq = sq + jnp.square(p["bias"])
      else:
        k = p["kernel"]
        if m.kind == "conv":
          axes = (0, 1, 2) if m.role == "out" else (0, 1, 3)
        else:
          axes = (0,) if m.role == "out" else (1,)
        sq = jnp.sum(jnp.square(k), axis=axes)
        if bias and m.role == "out" and "bias" in p:
          sq = sq + jnp.square(p["bias"])
      if kind == "absolute":
        total = total + jnp.sum(gamma * sq)
      else:
        per_channel = per_channel + sq
    if kind == "share":
      counted = jnp.where(gamma > 0, per_channel, 0.0)
      n_kept = jnp.sum(gamma > 0)
      # gamma decreases with importance: the q share with the largest gammas is the least
      # important one; rank by gamma (ties broken by index), kept channels only
      order = jnp.argsort(-jnp.where(gamma > 0, gamma, -1.0), stable=True)
      rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
      pushed = (gamma > 0) & (rank < jnp.floor(q * n_kept))
      total = total + 2.0 * jnp.sum(jnp.where(pushed, per_channel, 0.0)) / jax.lax.stop_gradient(
          jnp.maximum(jnp.sum(counted), 1e-12))
    elif kind == "relative":
      # gamma is 0 on masked-out channels and on ignored groups: they weigh nothing here either
      counted = jnp.where(gamma > 0, per_channel, 0.0)
      total = total + 2.0 * jnp.sum(gamma * counted) / jnp.maximum(jnp.sum(counted), 1e-12)
  return 0.5 * reg * total
