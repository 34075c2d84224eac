import numpy as np
import torch

from minildm.data.captions import parse
from minildm.judge import ReadObject
from minildm.metrics import alignment_report, bootstrap_alignment, clauses_hold, frechet_distance, psnr


def obj(shape, colour="red", size="small", cell=0):
    return ReadObject(shape, colour, size, cell, 1.0)


def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8)
    assert abs(psnr(x + 0.2, x) - 10 * np.log10(4 / 0.04)) < 1e-4
    assert psnr(x, x) > 90


def test_frechet_distance_closed_form_and_identity():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert abs(frechet_distance(a, a)) < 1e-6
    # shifted mean, same covariance: distance = |shift|²
    assert abs(frechet_distance(a, a + np.array([1.0, 2.0, 0.0])) - 5.0) < 1e-6
    # N(0, I) vs N(0, 4I) in 3-D: 3·(1 + 4 − 2·2) = 3
    b = rng.normal(size=(200_000, 3)) * 2
    c = rng.normal(size=(200_000, 3))
    assert abs(frechet_distance(c, b) - 3.0) < 0.1


def test_clause_rules_follow_geneval():
    two_red = parse("two red circles")
    assert clauses_hold(two_red, [obj("circle", cell=0), obj("circle", cell=1)])
    assert not clauses_hold(two_red, [obj("circle", cell=0)])
    assert not clauses_hold(two_red, [obj("circle", cell=c) for c in range(3)]), "counting is exact"
    assert clauses_hold(two_red, [obj("circle", cell=0), obj("circle", cell=1), obj("circle", "blue", cell=2)])
    a_circle = parse("a red circle")
    assert clauses_hold(a_circle, [obj("circle", cell=0), obj("circle", cell=1)]), "'a' means at least one"
    assert not clauses_hold(a_circle, [obj("circle", "blue")])


def test_relation_must_hold_for_every_pair():
    left = parse("a red circle to the left of a blue square")
    assert clauses_hold(left, [obj("circle", cell=3), obj("square", "blue", cell=5)])
    assert not clauses_hold(left, [obj("circle", cell=5), obj("square", "blue", cell=3)])
    assert not clauses_hold(left, [obj("circle", cell=3), obj("square", "blue", cell=5), obj("square", "blue", cell=0)])


def test_attribute_binding_is_checked():
    both = parse("a red circle and a blue square")
    assert clauses_hold(both, [obj("circle", "red"), obj("square", "blue", cell=1)])
    assert not clauses_hold(both, [obj("circle", "blue"), obj("square", "red", cell=1)]), "swapped colours"


def test_alignment_is_the_mean_over_categories():
    report = alignment_report([1, 1, 0, 0, 0, 1], ["a", "a", "b", "b", "b", "b"])
    assert report["alignment_by_category"] == {"a": 1.0, "b": 0.25}
    assert report["alignment"] == 0.625


def test_the_paired_bootstrap_follows_the_pairing():
    rng = np.random.default_rng(0)
    b = rng.normal(0, 1, 200)
    one_group = ["all"] * 200
    # a = b - 0.1 for every item: the paired difference is exactly -0.1 in every resample
    low, high = bootstrap_alignment(b - 0.1, b, one_group)["difference"]
    assert abs(low + 0.1) < 1e-9 and abs(high + 0.1) < 1e-9
    # independent noise of the same spread: an interval around zero, about ±1.96·√(2/200)
    low, high = bootstrap_alignment(rng.normal(0, 1, 200), b, one_group)["difference"]
    assert low < 0 < high and 0.15 < high - low < 0.45
