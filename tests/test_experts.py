"""eDiff-I's expert tree, the router and the prompt switch (minildm.experts), and the bootstrap."""

import pytest
import torch
import torch.nn as nn

from minildm.diffusion import NoiseSchedule
from minildm.experts import (ExpertRouter, equal_mass_split, expert_nodes, expert_tree, flat_experts, node_budgets,
                             prompt_switch, samples_on_interval)
from minildm.metrics import bootstrap_alignment
from minildm.samplers import ClassifierFreeGuidance, ddim_sample, sampling_timesteps


class Constant(nn.Module):
    """A stand-in expert that answers with its own number and counts its calls."""

    def __init__(self, value: float):
        super().__init__()
        self.value, self.calls, self.weight = value, 0, nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond):
        self.calls += 1
        return torch.full_like(x, self.value)


def test_the_tree_splits_equal_mass_and_grows_only_at_the_outermost_intervals():
    assert equal_mass_split(0, 1000) == 500 and equal_mass_split(750, 1000) == 875
    nodes, (low, middle, high) = expert_tree(1000, depth=2)
    by_name = {n.name: n for n in nodes}
    assert [(n.name, n.low, n.high, n.parent) for n in nodes] == [
        ("low_1", 0, 500, None), ("high_1", 500, 1000, None),
        ("low_2", 0, 250, "low_1"), ("high_2", 750, 1000, "high_1"), ("middle", 250, 750, None)]
    seen = set()
    for node in nodes:  # parents are trained before their children
        assert node.parent is None or node.parent in seen
        seen.add(node.name)
    edges = sorted((by_name[n].low, by_name[n].high) for n in (low, middle, high))
    assert edges == [(0, 250), (250, 750), (750, 1000)], "the ensemble tiles every timestep once"
    deeper, (low3, _, high3) = expert_tree(1000, depth=3)
    assert {n.name: (n.low, n.high) for n in deeper}[low3] == (0, 125)
    assert {n.name: (n.low, n.high) for n in deeper}[high3] == (875, 1000)
    with pytest.raises(ValueError):
        expert_tree(1000, depth=0)


def test_an_expert_counts_the_samples_its_ancestors_drew_on_its_interval():
    nodes, (low, middle, high) = expert_tree(1000, depth=2)
    steps = {"low_1": 100, "high_1": 200, "low_2": 40, "high_2": 10, "middle": 30}
    assert samples_on_interval(nodes, steps, low) == 40 + 100 * 250 / 500  # half of low_1's t fall on [0, 250)
    assert samples_on_interval(nodes, steps, high) == 10 + 200 * 250 / 500
    assert samples_on_interval(nodes, steps, "low_1") == 100, "a first-level node starts from the base"
    assert samples_on_interval(nodes, steps, middle) == 30, "the middle expert starts from the base"
    # equal steps per node: the outer experts see more of their interval than a single model trained
    # as long on every t (1.5 nodes' worth against 5 × 1/4), the middle one less (1 against 5 × 1/2)
    equal = {node.name: 1 for node in nodes}
    assert [samples_on_interval(nodes, equal, name) for name in (low, middle, high)] == [1.5, 1.0, 1.5]


def test_the_flat_control_gives_each_expert_the_single_models_samples_of_its_interval():
    tree, tree_ensemble = expert_tree(1000)
    nodes, ensemble = flat_experts(1000)
    assert ensemble == ("low", "middle", "high") and all(node.parent is None for node in nodes)
    by_name = {node.name: node for node in tree}
    assert [(n.low, n.high) for n in nodes] == [(by_name[name].low, by_name[name].high) for name in tree_ensemble]
    for per_node in (225, 4, 7):
        budgets = node_budgets("flat", nodes, per_node)
        assert sum(budgets.values()) == 5 * per_node, "the tree's budget: five nodes"
        assert sum(node_budgets("tree", tree, per_node).values()) == 5 * per_node
        for node in nodes:  # the single model, trained on every t for the same total, draws total × width / T
            share = 5 * per_node * (node.high - node.low) / 1000
            assert abs(samples_on_interval(nodes, budgets, node.name) - share) <= 1, (per_node, node.name)
    assert node_budgets("flat", nodes, 225) == {"low": 281, "middle": 563, "high": 281}
    with pytest.raises(ValueError, match="tree"):
        expert_nodes("deep")


def test_the_router_sends_each_timestep_to_its_expert():
    experts = {"low": Constant(1.0), "middle": Constant(2.0), "high": Constant(3.0)}
    router = ExpertRouter(experts, {"high": (750, 1000), "low": (0, 250), "middle": (250, 750)})
    x = torch.zeros(4, 2)
    router.trace = []
    for t, expected in ((0, 1.0), (249, 1.0), (250, 2.0), (749, 2.0), (750, 3.0), (999, 3.0)):
        assert router(x, torch.full((4,), t), None).unique().tolist() == [expected]
    assert [name for _, name in router.trace] == ["low", "low", "middle", "middle", "high", "high"]
    mixed = router(x, torch.tensor([10, 500, 900, 20]), {"c": torch.arange(4.0)})
    assert mixed[:, 0].tolist() == [1.0, 2.0, 3.0, 1.0]
    with pytest.raises(ValueError, match="outside"):
        router(x, torch.full((4,), 1000), None)
    with pytest.raises(ValueError, match="gaps"):
        ExpertRouter({"a": Constant(0), "b": Constant(1)}, {"a": (0, 400), "b": (500, 1000)})


def test_guidance_and_sampling_cost_one_expert_call_per_step():
    experts = {"low": Constant(0.0), "high": Constant(0.0)}
    router = ExpertRouter(experts, {"low": (0, 500), "high": (500, 1000)})
    router.trace = []
    guided = ClassifierFreeGuidance(router, 3.0, torch.zeros(2, 1))
    ddim_sample(guided, NoiseSchedule(), torch.randn(2, 3), torch.ones(2, 1), steps=10)
    assert experts["low"].calls + experts["high"].calls == 10, "both guidance passes go in one call"
    switches = [name for _, name in router.trace]
    assert switches == ["high"] * 5 + ["low"] * 5


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_prompt_switch_uses_a_for_the_first_fraction_of_the_steps(fraction):
    steps, used = 10, []
    timesteps = sampling_timesteps(1000, steps)
    k = round(fraction * steps)
    switch_at = timesteps[k] + 1 if k < steps else 0

    def first(x, t, c):
        used.append("A")
        return torch.zeros_like(x)

    def second(x, t, c):
        used.append("B")
        return torch.zeros_like(x)

    ddim_sample(prompt_switch(first, second, switch_at), NoiseSchedule(), torch.randn(1, 2), None, steps=steps)
    assert used == ["A"] * k + ["B"] * (steps - k)


def test_the_paired_bootstrap_brackets_the_difference():
    categories = ["a"] * 20 + ["b"] * 20
    same = [True, False] * 20
    assert bootstrap_alignment(same, same, categories, rounds=200)["difference"] == [0.0, 0.0]
    better = bootstrap_alignment([True] * 40, [False] * 40, categories, rounds=200)
    assert better["difference"] == [1.0, 1.0] and better["b"] == [0.0, 0.0]
    noisy = bootstrap_alignment(same, [not c for c in same][:20] + same[20:], categories, rounds=500)
    low, high = noisy["difference"]
    assert low < 0 < high, "half the prompts flipped either way: no difference is claimed"


def test_an_expert_trains_only_on_its_interval():
    schedule = NoiseSchedule()
    t = schedule.sample_timesteps(5000, generator=torch.Generator().manual_seed(0), interval=(750, 1000))
    assert t.min() >= 750 and t.max() <= 999 and len(t.unique()) > 200
