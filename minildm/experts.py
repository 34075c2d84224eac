"""eDiff-I's ensemble of expert denoisers (Balaji et al. 2022, Sec. 4), on the course's schedule.

**The observation.** Early in sampling (high noise) the denoiser's output depends strongly on
the text — that is where the layout is decided — and late (low noise) it hardly does: it adds
detail. One network with only a timestep input must cover both behaviours.

**The split.** Train one model on every noise level (the root), then split the noise range into
two intervals of *equal training-probability mass*, initialise two children from the parent and
fine-tune each only on its interval; recurse on the outermost intervals. eDiff-I's base model
ends as three experts: a high-noise expert (the rightmost leaf), a low-noise expert (the
leftmost leaf) and one model for everything in between.

eDiff-I trains with EDM's log-normal p(σ); LDM — and this course — draws the timestep
``t ~ Uniform{0, …, T−1}``, so intervals of equal mass are intervals of equal length in ``t``:
[0, 500) and [500, 1000) at the first level, [0, 250) and [750, 1000) at the second. The σ view
of the same edges (``NoiseSchedule.sigma``) is what the notebook draws.

**The router.** At sampling time the experts act as one denoiser with the usual signature
``(x_t, t, cond) → prediction``: each call goes to the expert whose interval holds ``t``, so a
sampling step costs exactly one network evaluation, as with a single model. Guidance calls it
once with the conditional and unconditional halves in one batch at the same ``t``, so both
passes use the same expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ExpertNode:
    """One node of the expert tree: fine-tuned from ``parent`` (None: the base model) on the
    timesteps ``[low, high)``."""

    name: str
    low: int
    high: int
    parent: str | None

    def holds(self, t: int) -> bool:
        return self.low <= t < self.high


def equal_mass_split(low: int, high: int) -> int:
    """The edge that cuts [low, high) into two intervals of equal training-probability mass
    (uniform timesteps: the midpoint)."""
    return (low + high) // 2


def expert_tree(steps: int = 1000, depth: int = 2) -> tuple[list[ExpertNode], tuple[str, str, str]]:
    """The nodes to fine-tune, parents before children, and the three-expert ensemble
    ``(low, middle, high)``.

    Level 1 splits [0, T) into two halves from the base model. Each further level splits only
    the outermost intervals (the lowest-noise and highest-noise ones), each child starting from
    its parent. The middle expert covers everything between the two outermost leaves and starts
    from the base model. ``depth=1`` is the two-expert ensemble (``middle`` is then empty).
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    nodes: list[ExpertNode] = []
    half = equal_mass_split(0, steps)
    low, high = ExpertNode("low_1", 0, half, None), ExpertNode("high_1", half, steps, None)
    nodes += [low, high]
    for level in range(2, depth + 1):
        low = ExpertNode(f"low_{level}", low.low, equal_mass_split(low.low, low.high), low.name)
        high = ExpertNode(f"high_{level}", equal_mass_split(high.low, high.high), high.high, high.name)
        nodes += [low, high]
    if depth == 1:
        return nodes, (low.name, "", high.name)
    middle = ExpertNode("middle", low.high, high.low, None)
    nodes.append(middle)
    return nodes, (low.name, middle.name, high.name)


SPLITS = ("tree", "flat")  # how the experts are grown: eDiff-I's tree, or the control (flat_experts)


def flat_experts(steps: int = 1000) -> tuple[list[ExpertNode], tuple[str, str, str]]:
    """The control for the tree, not eDiff-I's method: the same three intervals as the depth-2
    tree's ensemble, each expert fine-tuned straight from the base model.

    Given the tree's total budget in proportion to their widths (:func:`node_budgets`), each
    expert draws exactly as many samples of its interval as the equal-cost single model does,
    so the comparison measures specialisation alone; the tree spends part of the budget on
    first-level nodes, and its middle expert sees fewer samples of its interval than the single
    model (:func:`samples_on_interval`)."""
    tree, (low, middle, high) = expert_tree(steps)
    edges = {node.name: (node.low, node.high) for node in tree}
    nodes = [ExpertNode(role, *edges[name], None) for role, name in zip(("low", "middle", "high"), (low, middle, high))]
    return nodes, ("low", "middle", "high")


def expert_nodes(split: str, steps: int = 1000) -> tuple[list[ExpertNode], tuple[str, str, str]]:
    """The nodes to fine-tune and the ensemble for ``split``, one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return expert_tree(steps) if split == "tree" else flat_experts(steps)


def node_budgets(split: str, nodes: list[ExpertNode], per_node: int) -> dict[str, int]:
    """Fine-tuning steps per node. The budget is the tree's, ``per_node`` steps for each of its
    five nodes; the tree spends it evenly, the flat split in proportion to each interval's width
    (the widest interval takes what rounding leaves)."""
    if split == "tree":
        return {node.name: per_node for node in nodes}
    total = per_node * len(expert_tree()[0])
    span = sum(node.high - node.low for node in nodes)
    budgets = {node.name: round(total * (node.high - node.low) / span) for node in nodes}
    widest = max(nodes, key=lambda node: node.high - node.low).name
    budgets[widest] += total - sum(budgets.values())
    return budgets


def samples_on_interval(nodes: list[ExpertNode], steps: dict[str, int], name: str) -> float:
    """How many steps' worth of training samples node ``name`` drew on its own interval, counting
    the ones its ancestors drew there before it started from them (each node draws t uniformly on
    its interval, so the share of its steps that falls on ``name``'s interval counts).

    The equal-cost single model, trained on every t for as many steps as all the nodes
    together, draws ``total × (high − low) / T`` there: the tree spends some of the same budget on
    nodes that are not in the ensemble, so an expert can see fewer samples of its interval than
    the single model does (the middle expert, which starts from the base model, always does)."""
    by_name = {node.name: node for node in nodes}
    target = node = by_name[name]
    total = 0.0
    while node is not None:
        overlap = max(0, min(node.high, target.high) - max(node.low, target.low))
        total += steps[node.name] * overlap / (node.high - node.low)
        node = by_name.get(node.parent)
    return total


class ExpertRouter(nn.Module):
    """Several UNets as one denoiser: each call is routed by its timestep to the expert whose
    interval holds it. ``trace`` (when not None) collects ``(t, expert name)`` per call — where
    the switches happen in a sampling run."""

    def __init__(self, experts: dict[str, nn.Module], intervals: dict[str, tuple[int, int]]):
        super().__init__()
        if set(experts) != set(intervals):
            raise ValueError("every expert needs exactly one interval")
        self.experts = nn.ModuleDict(experts)
        self.intervals = dict(sorted(intervals.items(), key=lambda item: item[1][0]))
        edges = [bound for interval in self.intervals.values() for bound in interval]
        if any(a != b for a, b in zip(edges[1:-1:2], edges[2::2])):
            raise ValueError(f"the expert intervals must tile the timesteps without gaps: {self.intervals}")
        self.trace: list[tuple[int, str]] | None = None

    def expert_for(self, t: int) -> str:
        for name, (low, high) in self.intervals.items():
            if low <= t < high:
                return name
        raise ValueError(f"timestep {t} is outside every expert's interval {self.intervals}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        names = [self.expert_for(int(step)) for step in t.tolist()]
        if len(set(names)) == 1:  # a sampler's call: one timestep for the whole batch
            if self.trace is not None:
                self.trace.append((int(t[0]), names[0]))
            return self.experts[names[0]](x, t, cond)
        out = None
        for name in dict.fromkeys(names):  # a mixed batch (training-style): route each sample
            rows = torch.tensor([n == name for n in names], device=x.device)
            part = self.experts[name](x[rows], t[rows], _rows(cond, rows))
            out = part.new_empty((x.shape[0], *part.shape[1:])) if out is None else out
            out[rows] = part
        return out


def _rows(cond, rows: torch.Tensor):
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[rows]
    return {k: _rows(v, rows) for k, v in cond.items()}


def prompt_switch(first, second, switch_at: int):
    """A denoiser that follows ``first`` while ``t ≥ switch_at`` and ``second`` after (eDiff-I
    Fig. 4: sample with prompt A for the first part of the steps, then with prompt B). Both are
    denoisers with their condition bound (``cond`` is ignored)."""

    def denoiser(x, t, cond=None):
        return first(x, t, None) if int(t[0]) >= switch_at else second(x, t, None)

    return denoiser
