"""Global progressive structured pruning to a FLOPs target (docs/design.md section 6).

Torch-Pruning re-traces the network and rebuilds layers at every one of its 200 steps; here the
network keeps its full shapes and each group's channels carry a keep-vector, so one pruning
step is a pure function of ``(params, keep)`` and the whole search is a single jitted
``lax.while_loop`` (:func:`progressive_prune`) or ``lax.scan`` (:func:`pruning_trajectory`,
the accuracy-vs-speed-up curves). Materialise the result once with
:func:`metaprune_jax.prune.masks.materialize`.

One step ``s`` (1-based) of the reference's schedule, for the groups of
:func:`metaprune_jax.prune.groups.pruning_groups` (ignored groups excluded when the search starts):

1. importance: group-L2 (or ``random``) over the kept channels, normalised per group;
2. eligible groups: those with more than one kept channel; ``N0`` is the number of channels in
   groups eligible at the start;
3. ``n = (kept channels of eligible groups) - int(N0 * (1 - s / steps))``; if ``n > 0`` the
   threshold is the ``n``-th smallest importance over all eligible channels and every channel at
   or below it is removed (ties remove more), except in a group where that would remove every
   channel (skipped this step);
4. MACs of the kept widths; the search stops at the first step whose speed-up over the
   network at the start reaches the target, or after ``steps`` steps.

``round_to`` (Torch-Pruning's ``round_to``, default 1 = the reference): in step 3, a group that
loses ``n`` channels loses instead its ``n'`` least important kept channels, where
``width - n'`` is ``width - n`` rounded down to a multiple of ``round_to`` (as Torch-Pruning's
``_round_to``); a group that would lose every channel that way is skipped this step. Kept widths
then stay multiples of ``round_to`` (when they start as ones), which is what vector units and
convolution libraries like; MACs are still counted exactly at the widths kept. ``round_to=1``
takes the reference's code path unchanged.

``max_pruning_ratio`` (Torch-Pruning's ``max_pruning_ratio``, default 1.0 = the reference): no
group is pruned below ``max(1, ceil((1 - r) * w0))`` channels, ``w0`` its kept width when the
search starts. A group at its floor is not eligible (step 2); a group whose step-3 removals
would take it below keeps its floor, losing only its least important channels down to it (the
floor wins over ``round_to``). The global schedule then has to find its MACs elsewhere, so no
layer collapses to a channel or two while others stay wide. ``1.0`` takes the reference's code
path unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metaprune_jax.nets import macs as macs_lib
from metaprune_jax.nets.arch import Arch
from metaprune_jax.prune import groups as groups_lib
from metaprune_jax.prune import masks as masks_lib

CRITERIA = ("l2", "random")


class _Plan:
  """Static description of a search (hashable by identity; built on the host)."""

  def __init__(self, arch: Arch, start_counts: Mapping[str, int], input_shape, steps: int,
               criterion: str, normalizer: str, round_to: int = 1,
               max_pruning_ratio: float = 1.0):
    self.round_to = check_round_to(round_to)
    self.max_ratio = check_max_pruning_ratio(max_pruning_ratio)
    if criterion not in CRITERIA:
      raise ValueError(f"unknown pruning criterion {criterion!r}; choose from {CRITERIA}")
    if normalizer not in groups_lib.NORMALIZERS:
      raise ValueError(f"unknown normalizer {normalizer!r}; choose from "
                       f"{groups_lib.NORMALIZERS}")
    self.arch = arch
    # ignored layers are decided at the widths the search starts from (a fresh pruner)
    current = arch.with_widths(start_counts)
    kept_spaces = {g.space for g in groups_lib.pruning_groups(current)}
    self.groups = tuple(g for g in groups_lib.pruning_groups(arch, ignore_classes=False)
                        if g.space in kept_spaces)
    self.steps = int(steps)
    self.criterion, self.normalizer = criterion, normalizer
    self.mac_terms, _ = macs_lib.count_terms(arch, tuple(int(v) for v in input_shape))
    self.space_index = {s: i for i, s in enumerate(arch.spaces)}
    # the smallest width each group may reach (1: the reference's rule, never empty)
    self.min_keep = {g.space: max(1, math.ceil((1.0 - self.max_ratio) * start_counts[g.space]
                                               - 1e-9)) for g in self.groups}
    n0 = sum(start_counts[g.space] for g in self.groups if start_counts[g.space] > 1)
    # int(N0 * (1 - ratio)) exactly as Python computes it, ratio = (s / steps) * 1.0
    self.floor_kept = np.array([int(n0 * (1 - (s / float(steps)) * 1.0))
                                for s in range(steps + 1)], np.int32)


def check_round_to(round_to) -> int:
  """``round_to`` as an int; ValueError unless it is an integer >= 1 (bools rejected)."""
  ok = isinstance(round_to, (int, np.integer)) and not isinstance(round_to, (bool, np.bool_))
  if not ok or int(round_to) < 1:
    raise ValueError(f"round_to must be an integer >= 1 (channel counts are rounded to its "
                     f"multiples), got {round_to!r}")
  return int(round_to)


def check_max_pruning_ratio(ratio) -> float:
  """``max_pruning_ratio`` as a float; ValueError unless it is a number in (0, 1]."""
  ok = isinstance(ratio, (int, float, np.integer, np.floating)) and not isinstance(
      ratio, (bool, np.bool_))
  if not ok or not 0.0 < float(ratio) <= 1.0:
    raise ValueError(f"max_pruning_ratio must be a number in (0, 1] (the largest share of a "
                     f"group's channels pruning may remove; 1: no limit), got {ratio!r}")
  return float(ratio)


def _layer_sq(arch: Arch, params):
  """Squared weights reduced over the kernel window, once per search: conv/dense
  ``[in, out]``, BatchNorm ``[c]`` (scale squared)."""
  out = {}
  for l in arch.layers:
    p = params[l.name]
    if l.kind == "conv":
      out[l.name] = jnp.sum(jnp.square(p["kernel"]), axis=(0, 1))
    elif l.kind == "dense":
      out[l.name] = jnp.square(p["kernel"])
    else:
      out[l.name] = jnp.square(p["scale"])
  return out


def _importance(plan: _Plan, sq, keep, key, step):
  """Normalised importance per group over kept channels; ``[width]`` each.

  Group L2 of the masked network without materialising it: a member's squared slice norm is a
  product of its reduced squared weights with the keep-vector of the other axis.
  """
  out = []
  for gi, g in enumerate(plan.groups):
    k = keep[g.space]
    if plan.criterion == "random":
      out.append(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, step), gi),
                                    k.shape))
      continue
    total = 0.0
    for m in g.members:
      l = plan.arch.layer(m.layer)
      s2 = sq[m.layer]
      if l.kind == "bn":
        total = total + s2
      elif m.role == "out":
        ki = keep.get(l.in_space)
        total = total + (jnp.sum(s2, axis=0) if ki is None else ki @ s2)
      else:
        ko = keep.get(l.out_space)
        total = total + (jnp.sum(s2, axis=1) if ko is None else s2 @ ko)
    imp = total / len(g.members)
    if plan.normalizer == "max":
      imp = imp / jnp.max(jnp.where(k > 0, imp, -jnp.inf))
    elif plan.normalizer == "mean":
      imp = imp / (jnp.sum(imp * k) / jnp.sum(k))
    out.append(imp)
  return out


def _counts(plan: _Plan, keep, fixed_counts):
  c = jnp.asarray(fixed_counts, jnp.float32)
  for s, k in keep.items():
    c = c.at[plan.space_index[s]].set(jnp.sum(k))
  return c


def _step(plan: _Plan, sq, keep, step, key):
  """One reference pruning step (``step`` 1-based, traced). Returns the new keep dict."""
  imps = _importance(plan, sq, keep, key, step)
  widths = [jnp.sum(keep[g.space]) for g in plan.groups]
  limited = plan.max_ratio < 1.0
  eligible = [w > (plan.min_keep[g.space] if limited else 1)
              for g, w in zip(plan.groups, widths)]
  cand = jnp.concatenate([jnp.where((keep[g.space] > 0) & e, imp, jnp.inf)
                          for g, imp, e in zip(plan.groups, imps, eligible)])
  total = sum(jnp.where(e, w, 0) for e, w in zip(eligible, widths)).astype(jnp.int32)
  n_prune = total - jnp.asarray(plan.floor_kept)[step]
  srt = jnp.sort(cand)
  thres = srt[jnp.clip(n_prune - 1, 0, cand.shape[0] - 1)]
  new = dict(keep)
  for g, imp, e, w in zip(plan.groups, imps, eligible, widths):
    k = keep[g.space]
    rm = (k > 0) & (imp <= thres) & e & (n_prune > 0)
    if plan.round_to > 1:
      rm = _round_removal(k, imp, rm, w, plan.round_to)
    if limited:
      rm = _floor_removal(k, imp, rm, w, plan.min_keep[g.space])
    empties = jnp.sum(rm) >= w
    new[g.space] = jnp.where(rm & ~empties, 0.0, k)
  return new


def _kept_rank(k, imp):
  """``[C]`` int32: each channel's rank by importance, kept ones first (ties by index, as a
  stable argsort)."""
  order = jnp.argsort(jnp.where(k > 0, imp, jnp.inf), stable=True)
  return jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.shape[0],
                                                                    dtype=jnp.int32))


def _round_removal(k, imp, rm, width, round_to: int):
  """Torch-Pruning's ``_round_to``: a group losing ``n > 0`` channels loses its ``n'`` least
  important kept ones, ``width - n'`` = ``width - n`` rounded down to a multiple of ``round_to``.

  Args:
    k: ``[C]`` keep-vector; imp: ``[C]`` importance; rm: ``[C]`` bool, the step's removals;
    width: ``[]`` kept channels; round_to: static int > 1.
  """
  n = jnp.sum(rm).astype(jnp.int32)
  kept_after = width.astype(jnp.int32) - n
  n_round = jnp.where(n > 0, width.astype(jnp.int32) - (kept_after - kept_after % round_to), 0)
  rank = _kept_rank(k, imp)
  return (k > 0) & (rank < n_round)


def _floor_removal(k, imp, rm, width, floor: int):
  """At most ``width - floor`` of the step's removals ``rm``: the least important kept ones.

  Args:
    k: ``[C]`` keep-vector; imp: ``[C]`` importance; rm: ``[C]`` bool, the step's removals
    (the least important kept channels); width: ``[]`` kept channels; floor: static int >= 1.
  """
  allowed = jnp.maximum(width.astype(jnp.int32) - floor, 0)
  rank = _kept_rank(k, imp)
  return rm & (rank < jnp.minimum(jnp.sum(rm).astype(jnp.int32), allowed))


def _prepare(arch, variables, masks, input_shape, steps, criterion, normalizer, round_to=1,
             max_pruning_ratio=1.0):
  masks = dict(masks or {})
  masks_lib.check_masks(arch, masks)
  start = {s: (int(np.sum(np.asarray(masks[s]) > 0.5)) if s in masks else arch.width(s))
           for s in arch.spaces}
  plan = _cached_plan(arch, start, input_shape, steps, criterion, normalizer, round_to,
                      max_pruning_ratio)
  keep = {g.space: (jnp.asarray(masks[g.space], jnp.float32) if g.space in masks
                    else jnp.ones((g.width,), jnp.float32)) for g in plan.groups}
  fixed = [start[s] for s in arch.spaces]
  params = variables["params"] if "params" in variables else variables
  return plan, keep, fixed, params, start


@functools.partial(jax.jit, static_argnums=(0,))
def _search(plan, params, keep, fixed, target, key):
  base = macs_lib.macs_of_counts(plan.mac_terms, _counts(plan, keep, fixed))
  sq = _layer_sq(plan.arch, params)

  def cond(c):
    step, _, speed = c
    return (step < plan.steps) & (speed < target)

  def body(c):
    step, keep, _ = c
    keep = _step(plan, sq, keep, step + 1, key)
    speed = base / macs_lib.macs_of_counts(plan.mac_terms, _counts(plan, keep, fixed))
    return step + 1, keep, speed
  return jax.lax.while_loop(cond, body, (jnp.int32(0), keep, jnp.float32(1.0)))


@functools.partial(jax.jit, static_argnums=(0,))
def _trajectory(plan, params, keep, fixed, key):
  base = macs_lib.macs_of_counts(plan.mac_terms, _counts(plan, keep, fixed))
  sq = _layer_sq(plan.arch, params)

  def body(keep, step):
    keep = _step(plan, sq, keep, step, key)
    return keep, (keep, base / macs_lib.macs_of_counts(plan.mac_terms,
                                                        _counts(plan, keep, fixed)))
  _, (hist, speeds) = jax.lax.scan(body, keep, jnp.arange(1, plan.steps + 1))
  return hist, speeds


_PLAN_CACHE: dict = {}


def _cached_plan(arch, start, input_shape, steps, criterion, normalizer, round_to=1,
                 max_pruning_ratio=1.0):
  key = (arch, tuple(sorted(start.items())), tuple(input_shape), steps, criterion, normalizer,
         round_to, float(max_pruning_ratio))
  if key not in _PLAN_CACHE:
    _PLAN_CACHE[key] = _Plan(arch, start, input_shape, steps, criterion, normalizer, round_to,
                             max_pruning_ratio)
  return _PLAN_CACHE[key]


def _exact_speed_up(arch, start, keep, input_shape):
  base, _ = macs_lib.count_macs(arch.with_widths(start), input_shape)
  counts = dict(start)
  counts.update({s: int(np.sum(np.asarray(k) > 0.5)) for s, k in keep.items()})
  now, _ = macs_lib.count_macs(arch.with_widths(counts), input_shape)
  return base / now


class PruneResult(NamedTuple):
  """``masks``: ``{space: [width] float32}``; ``speed_up``: exact MACs ratio (float);
  ``steps``: pruning steps taken."""

  masks: dict
  speed_up: float
  steps: int


def progressive_prune(arch: Arch, variables: Mapping, target_speed_up: float,
                      input_shape=(1, 3, 32, 32), **kw) -> tuple[dict, float]:
  """``(masks, speed_up)`` of :func:`prune_to_target` (same arguments).

  Returns:
    ``(masks, speed_up)``: ``{space: [width] float32}`` keep-vectors and the exact MACs
    speed-up (float), as :class:`PruneResult`'s fields.

  Raises:
    ValueError: as :func:`prune_to_target`.
  """
  res = prune_to_target(arch, variables, target_speed_up, input_shape, **kw)
  return res.masks, res.speed_up


def prune_to_target(arch: Arch, variables: Mapping, target_speed_up: float,
                    input_shape=(1, 3, 32, 32), *, masks: Mapping | None = None,
                    criterion: str = "l2", normalizer: str = "max", steps: int = 200,
                    rng: jax.Array | None = None, round_to: int = 1,
                    max_pruning_ratio: float = 1.0) -> PruneResult:
  """Prunes to a MACs speed-up with the reference's global progressive schedule.

  Args:
    arch: the architecture (full shapes of ``variables``).
    variables: ``{'params', ...}``; masked networks pass their ``masks`` too.
    target_speed_up: MACs(start) / MACs(end) to reach; > 1.
    input_shape: NCHW input for MAC counting, as :func:`~metaprune_jax.nets.macs.count_macs`.
    masks: optional keep-vectors the search starts from (already pruned channels).
    criterion: ``l2`` (group L2, the reference) or ``random``.
    normalizer: ``max`` (the reference), ``mean`` or ``none``.
    steps: the schedule's number of steps (200).
    rng: key for the ``random`` criterion.
    round_to: kept channel counts rounded down to multiples of this (module docstring);
      1: the reference's decisions.
    max_pruning_ratio: the largest share of each group's channels (at the start of the
      search) that may be removed, in (0, 1] (module docstring); 1: the reference's decisions.

  Returns:
    :class:`PruneResult`: masks for every group space (the ``masks`` passed in updated), the
    speed-up reached relative to the network passed in (float, counted exactly), steps taken.

  Raises:
    ValueError: target <= 1, or one the schedule cannot reach (the message gives the largest
      reachable speed-up), bad masks, unknown criterion/normalizer, ``round_to`` not an
      integer >= 1, ``max_pruning_ratio`` outside (0, 1].
  """
  if not target_speed_up > 1.0:
    raise ValueError(f"target speed-up must be > 1, got {target_speed_up}")
  round_to = check_round_to(round_to)
  max_pruning_ratio = check_max_pruning_ratio(max_pruning_ratio)
  plan, keep, fixed, params, start = _prepare(arch, variables, masks, input_shape, steps,
                                              criterion, normalizer, round_to, max_pruning_ratio)
  key = rng if rng is not None else jax.random.PRNGKey(0)
  step, keep, speed = _search(plan, params, keep, fixed, jnp.float32(target_speed_up), key)
  keep = jax.device_get(keep)
  exact = _exact_speed_up(arch, start, keep, input_shape)
  if exact < target_speed_up:
    raise ValueError(f"{arch.name}: target speed-up {target_speed_up} is unreachable: "
                     f"{int(step)} pruning steps reach at most {exact:.4f}x without emptying a "
                     "group")
  out = dict(masks or {})
  out.update({s: jnp.asarray(k) for s, k in keep.items()})
  return PruneResult(out, float(exact), int(step))


def traced_prune_masks(arch: Arch, params, masks: Mapping | None, target_speed_up: float,
                       input_shape=(1, 3, 32, 32), *, normalizer: str = "max",
                       steps: int = 200, max_pruning_ratio: float = 1.0) -> dict:
  """:func:`prune_to_target`'s group-L2 search inside a traced computation. Jittable.

  For a masked full-width network whose ``params`` are traced (e.g. the metanetwork's output
  inside a meta-training step): the schedule is planned at ``arch``'s full widths (one static
  plan for every mask), the search starts from ``masks`` and stops at the first step whose
  MACs speed-up over the *masked* network reaches ``target_speed_up`` (or after ``steps``);
  nothing is checked on the host, so an unreachable target returns the last step's masks.

  Args:
    arch: the full-width architecture; params: its params (traced or not; no gradient flows
      through the choice); masks: ``{space: [width]}`` keep-vectors to start from, or None.
    target_speed_up: static float > 1; input_shape: NCHW for MAC counting.
    normalizer, steps, max_pruning_ratio: as :func:`prune_to_target`.

  Returns:
    ``{space: [width] float32}``: ``masks`` with every group space replaced by its pruned
    keep-vector.
  """
  if not target_speed_up > 1.0:
    raise ValueError(f"target speed-up must be > 1, got {target_speed_up}")
  start = {s: arch.width(s) for s in arch.spaces}
  plan = _cached_plan(arch, start, tuple(int(v) for v in input_shape), int(steps), "l2",
                      normalizer, 1, check_max_pruning_ratio(max_pruning_ratio))
  keep = {g.space: (jnp.asarray(masks[g.space], jnp.float32) if masks and g.space in masks
                    else jnp.ones((g.width,), jnp.float32)) for g in plan.groups}
  params = jax.lax.stop_gradient(params)
  _, keep, _ = _search(plan, params, keep, [start[s] for s in arch.spaces],
                       jnp.float32(target_speed_up), jax.random.PRNGKey(0))
  out = dict(masks or {})
  out.update(keep)
  return out


def pruning_trajectory(arch: Arch, variables: Mapping, input_shape=(1, 3, 32, 32), *,
                       masks: Mapping | None = None, criterion: str = "l2",
                       normalizer: str = "max", steps: int = 200,
                       rng: jax.Array | None = None, round_to: int = 1,
                       max_pruning_ratio: float = 1.0) -> tuple[dict, np.ndarray]:
  """Every step of a full schedule: ``({space: [steps, width]}, speed_ups [steps])``.

  Step ``i`` of the outputs is the state after pruning step ``i + 1``. Used for the
  accuracy-vs-speed-up curves and adaptive pruning.

  Args:
    arch, variables, input_shape, masks, criterion, normalizer, rng, round_to,
      max_pruning_ratio: as :func:`prune_to_target`.
    steps: the schedule's number of steps (200); all of them are taken.

  Returns:
    ``(history, speed_ups)``: ``history`` is ``{space: [steps, width] float32}`` (numpy), the
    keep-vector of every group space after each step; ``speed_ups`` is ``[steps]`` float64,
    the MACs speed-up of each step relative to the network passed in (computed in float32
    inside the search, not recounted exactly as :func:`prune_to_target` does).

  Raises:
    ValueError: bad masks, unknown criterion/normalizer, ``round_to`` not an integer >= 1,
      ``max_pruning_ratio`` outside (0, 1].
  """
  round_to = check_round_to(round_to)
  max_pruning_ratio = check_max_pruning_ratio(max_pruning_ratio)
  plan, keep, fixed, params, start = _prepare(arch, variables, masks, input_shape, steps,
                                              criterion, normalizer, round_to, max_pruning_ratio)
  key = rng if rng is not None else jax.random.PRNGKey(0)
  hist, speeds = _trajectory(plan, params, keep, fixed, key)
  return jax.device_get(hist), np.asarray(speeds, np.float64)


def adaptive_prune(arch: Arch, variables: Mapping, accuracy_fn: Callable[[dict], float],
                   threshold: float, input_shape=(1, 3, 32, 32), *,
                   masks: Mapping | None = None, max_speed_up: float = float("inf"),
                   criterion: str = "l2", normalizer: str = "max", steps: int = 200,
                   rng: jax.Array | None = None, round_to: int = 1) -> tuple[dict, float, list]:
  """Prunes step by step while ``accuracy_fn(masks) >= threshold``.

  ``accuracy_fn`` evaluates the masked network (e.g. test accuracy; the engine does no data
  loading). The schedule is :func:`pruning_trajectory`'s; it stops at the first step below
  ``threshold``, at ``max_speed_up`` or after ``steps`` steps.

  Args:
    arch, variables, input_shape, masks, criterion, normalizer, steps, rng, round_to: as
      :func:`prune_to_target`.
    accuracy_fn: ``masks -> float``, called once per step with ``{space: [width] float32}``
      keep-vectors (the ``masks`` passed in updated).
    threshold: the lowest accuracy accepted.
    max_speed_up: stop once a step reaches this speed-up (that step is kept).

  Returns:
    ``(masks, speed_up, history)``: the masks and speed-up (float) of the last state at or
    above the threshold (the ``masks`` passed in and 1.0 if the first step is already below);
    ``history`` = ``[(step, speed_up, accuracy), ...]`` for every step evaluated, the failing
    one included.

  Raises:
    ValueError: as :func:`pruning_trajectory`.
  """
  hist, speeds = pruning_trajectory(arch, variables, input_shape, masks=masks,
                                    criterion=criterion, normalizer=normalizer, steps=steps,
                                    rng=rng, round_to=round_to)
  best = dict(masks or {})
  best_speed, log = 1.0, []
  for i in range(steps):
    m = dict(masks or {})
    m.update({s: jnp.asarray(h[i]) for s, h in hist.items()})
    acc = float(accuracy_fn(m))
    log.append((i + 1, float(speeds[i]), acc))
    if acc < threshold:
      break
    best, best_speed = m, float(speeds[i])
    if speeds[i] >= max_speed_up:
      break
  return best, best_speed, log
