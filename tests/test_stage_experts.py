"""Stage 4: the expert tree fine-tuned from an LDM run, its router, and the equal-cost comparison."""

import json

import pytest
import torch

from minildm.cli import main
from minildm.config import get_profile, with_overrides
from minildm.experts import ExpertRouter
from minildm.stages import experts as experts_stage
from minildm.stages import ldm as ldm_stage


@pytest.fixture(scope="module")
def experts_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    profile = with_overrides(get_profile("smoke"), ["ldm_train.steps=20"])
    ldm_stage.train(profile, str(root / "base"), progress=False)
    card = experts_stage.train(profile, str(root / "run"), base=str(root / "base"), progress=False)
    return card, root


def test_the_tree_is_fine_tuned_from_the_base_and_the_baseline_gets_the_same_steps(experts_run):
    card, root = experts_run
    per_node = get_profile("smoke").experts_train.steps
    assert [n["name"] for n in card["tree"]] == ["low_1", "high_1", "low_2", "high_2", "middle"]
    assert card["steps"] == 5 * per_node and card["baseline"]["steps"] == 5 * per_node
    runs = [*card["nodes"].values(), card["baseline"], card["multi_embedding"]]
    assert card["training_steps"] == 10 * per_node + card["multi_embedding"]["steps"]
    assert card["training_wall_time_s"] == pytest.approx(sum(r["wall_time_s"] for r in runs), abs=0.05)
    assert card["training_wall_time_s"] > card["wall_time_s"], "the nodes' time is only part of the stage's"
    assert {role: e["interval"] for role, e in card["experts"].items()} == {
        "low": [0, 250], "middle": [250, 750], "high": [750, 1000]}
    node = json.loads((root / "run" / "nodes" / "high_2" / "card.json").read_text())
    assert node["interval"] == [750, 1000] and node["steps"] == per_node
    from minildm.checkpoints import load_checkpoint

    base_state, _ = load_checkpoint(root / "base")
    high_state, _ = load_checkpoint(root / "run" / "nodes" / "high_2")
    unet_keys = [k for k in base_state if k.startswith("unet.")]
    assert any(not torch.equal(base_state[k], high_state[k]) for k in unet_keys), "the expert trained"
    text_key = next(k for k in base_state if k.startswith("text."))
    assert torch.equal(base_state[text_key], high_state[text_key]), "the text tower stays frozen"


def test_the_card_measures_the_observation_and_the_comparison(experts_run):
    card, _ = experts_run
    m = card["metrics"]
    for key in ("alignment", "fid", "base_alignment", "base_fid", "nfe"):
        assert isinstance(m[key], float | int), key
    low, high = m["alignment_gain_ci"]
    assert low <= m["alignment_gain"] + 1e-9 and m["alignment_gain"] - 1e-9 <= high
    assert list(m["prompt_switch"]) == [f"{f:.1f}" for f in experts_stage.SWITCH_FRACTIONS]
    assert all(0 <= v <= 1 for v in m["prompt_switch"].values())
    assert list(m["prompt_switch_karras"]) == list(m["prompt_switch"])
    assert all(0 <= v <= 1 for v in m["prompt_switch_karras"].values())
    for split in ("shape", "colour", "shape_karras", "colour_karras"):  # following B in full needs both
        curve, whole = m[f"prompt_switch_{split}"], m["prompt_switch_karras" if "karras" in split else "prompt_switch"]
        assert list(curve) == list(whole) and all(whole[f] <= v <= 1 for f, v in curve.items()), split
    assert m["switch_t"]["1.0"] is None and m["switch_t_karras"]["1.0"] is None, "f = 1: never switched"
    assert m["switch_t_karras"]["0.0"] == 999, "EDM's spacing starts at the noisiest step"
    karras_t = [t for t in m["switch_t_karras"].values() if t is not None]
    assert karras_t == sorted(karras_t, reverse=True)
    assert len(m["text_influence"]) == 20 and all(v >= 0 for v in m["text_influence"].values())
    assert all(0 <= v <= 1.0001 for v in m["attention_entropy"].values())
    assert m["nfe"] == 2 * m["steps"], "a router costs one UNet per evaluation, as a single model"
    e = m["embeddings"]
    for key in ("alignment_text", "alignment_both", "image_match", "image_match_unconditional", "alignment_style"):
        assert 0 <= e[key] <= 1, key
    assert e["background_distance_text"] >= 0 and e["background_distance_reference"] >= 0
    losses = m["interval_loss"]
    assert losses["intervals"] == {role: card["experts"][role]["interval"] for role in experts_stage.ROLES}
    for name in ("low", "middle", "high", "all"):
        loss, difference = losses["loss"][name], losses["difference"][name]
        assert set(loss) == {"experts", "baseline"} and all(v > 0 for v in loss.values()), name
        assert difference == pytest.approx(loss["experts"] - loss["baseline"], abs=1e-6), name
        low, high = losses["difference_ci"][name]
        assert low - 1e-9 <= difference <= high + 1e-9, name
    per_node = card["nodes"]["middle"]["steps"]
    assert m["samples_on_interval"]["middle"] == {"experts": per_node, "baseline": card["baseline"]["steps"] / 2}


def test_the_loaded_experts_route_by_timestep_and_sample(experts_run):
    _, root = experts_run
    model, _ = experts_stage.load(root / "run")
    assert isinstance(model.pipeline.unet, ExpertRouter)
    model.pipeline.unet.trace = []
    images = model.pipeline(["a red circle"], steps=10, seed=0)
    assert images.shape == (1, 3, 32, 32)
    assert [name for _, name in model.pipeline.unet.trace] == ["high"] * 2 + ["middle"] * 5 + ["low"] * 3


def test_the_interval_loss_tells_the_experts_apart_only_where_they_differ(experts_run):
    """Experts that are all copies of the single model lose exactly as much as it does; changing
    the high-noise expert changes the loss on its interval (and on every t) and nowhere else."""
    import copy

    _, root = experts_run
    model, card = experts_stage.load(root / "run")
    single = model.baseline
    intervals = {role: tuple(card["experts"][role]["interval"]) for role in experts_stage.ROLES}
    router = ExpertRouter({role: copy.deepcopy(single.unet) for role in intervals}, intervals)
    copies = copy.copy(single)
    copies.unet = router
    same = experts_stage.interval_losses({"experts": copies, "baseline": single}, intervals, n=64)
    assert all(same["difference"][name] == 0 for name in ("low", "middle", "high")), same["difference"]
    # every t: the router splits the batch by expert, and smaller batches may round differently
    assert same["difference"]["all"] == pytest.approx(0, abs=1e-6)
    with torch.no_grad():
        for p in router.experts["high"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    changed = experts_stage.interval_losses({"experts": copies, "baseline": single}, intervals, n=64)
    assert changed["difference"]["low"] == 0 and changed["difference"]["middle"] == 0
    assert abs(changed["difference"]["high"]) > 1e-4 and abs(changed["difference"]["all"]) > 1e-5
    assert changed["loss"]["low"] == same["loss"]["low"], "the same items, t and noise every time"


def test_eval_from_the_command_line_and_wrong_inputs(experts_run, capsys, tmp_path):
    _, root = experts_run
    assert main(["eval", "experts", "--model", str(root / "run"), "--n", "12", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["n"] == 12 and "alignment_gain_ci" in figures
    assert main(["eval", "experts", "--model", str(root / "base"), "--n", "12"]) == 2
    assert "not experts" in capsys.readouterr().err
    assert main(["train", "experts", "--profile", "smoke", "--base", str(root / "run"), "--out", str(tmp_path / "x")]) == 2
    assert "stage ldm" in capsys.readouterr().err
    assert main(["train", "judge", "--profile", "smoke", "--base", str(root / "base"), "--out", str(tmp_path / "y")]) == 2
    assert "--base applies" in capsys.readouterr().err


def test_the_flat_control_trains_three_experts_straight_from_the_base(experts_run, tmp_path, capsys):
    _, root = experts_run
    profile = with_overrides(get_profile("smoke"), ["extras.experts_split=flat"])
    card = experts_stage.train(profile, str(tmp_path / "flat"), base=str(root / "base"), progress=False, eval_n=6)
    per_node = profile.experts_train.steps
    assert card["split"] == "flat" and [n["name"] for n in card["tree"]] == ["low", "middle", "high"]
    assert {name: node["steps"] for name, node in card["nodes"].items()} == {"low": 5, "middle": 10, "high": 5}
    assert card["steps"] == card["baseline"]["steps"] == 5 * per_node
    assert all(s["experts"] == s["baseline"] for s in card["metrics"]["samples_on_interval"].values())
    assert experts_stage.part_done(tmp_path / "flat", "tree", "flat")
    assert not experts_stage.part_done(tmp_path / "flat", "tree"), "the tree's nodes were not trained"
    model, _ = experts_stage.load(tmp_path / "flat")
    assert model.pipeline(["a red circle"], steps=4, seed=0).shape == (1, 3, 32, 32)
    assert main(["train", "experts", "--profile", "smoke", "--base", str(root / "base"), "--out", str(tmp_path / "x"),
                 "--set", "extras.experts_split=deep"]) == 2
    assert "expected one of tree, flat" in capsys.readouterr().err
    assert not any((tmp_path / "x").iterdir()), "nothing written"


def test_the_experts_read_the_base_runs_encoded_items(experts_run):
    """The base LDM keeps its encoded items; the tree, the baseline and the multi-embedding model
    read them there rather than encoding (and keeping) their own."""
    from minildm.stages.items import ITEMS

    _, root = experts_run
    assert (root / "base" / ITEMS).is_file()
    assert not (root / "run" / ITEMS).exists()
