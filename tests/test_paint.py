"""Paint-with-words (minildm.paint): masks, phrases → tokens, the attention bias, sampling, CLI."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from minildm.attention import Attention
from minildm.cli import main
from minildm.errors import UserError
from minildm.paint import (RECIPES, PaintHook, PaintRecipe, as_mask, box_mask, eos_position, explain_step,
                           paint_weight, parse_paint_argument, phrase_tokens, sample_painted, token_masks)
from minildm.stages import ldm as ldm_stage
from minildm.stages import paint as paint_stage


@pytest.fixture(scope="module")
def pipeline():
    return ldm_stage.load(None)[0]


def test_boxes_and_masks_are_checked():
    mask = box_mask((0.0, 0.5, 0.5, 1.0), 8)
    assert mask.sum() == 16 and mask[4:, :4].all() and mask[:4].sum() == 0
    assert as_mask(np.ones((4, 4)) * 0.5, 8, "x").shape == (4, 4)
    with pytest.raises(UserError, match="square 2-D"):
        as_mask(np.ones((4, 5)), 8, "red circle")
    with pytest.raises(UserError, match="empty"):
        as_mask(np.zeros((8, 8)), 8, "red circle")
    with pytest.raises(UserError, match=r"outside \[0, 1\]"):
        as_mask(np.full((8, 8), 2.0), 8, "red circle")
    with pytest.raises(UserError, match="x0 < x1"):
        box_mask((0.5, 0.0, 0.2, 1.0), 8)


def test_phrases_map_to_their_own_tokens_even_when_words_repeat(pipeline):
    encoder = pipeline.encoder
    prompt = "a red circle and a red square"  # <bos> a red circle and a red square <eos>
    assert phrase_tokens(encoder, prompt, "red circle") == [2, 3]
    assert phrase_tokens(encoder, prompt, "red square") == [6, 7]
    assert phrase_tokens(encoder, prompt, "red") == [2, 6], "a bare repeated word paints every occurrence"
    with pytest.raises(UserError, match="not in the prompt"):
        phrase_tokens(encoder, prompt, "blue square")
    masks = token_masks(encoder, [prompt], [{"red circle": (0, 0, 0.5, 0.5), "red square": (0.5, 0.5, 1, 1)}], 4, 9)
    assert masks.shape == (1, 16, 9)
    assert masks[0, 0, 2] == 1 and masks[0, 15, 2] == 0 and masks[0, 15, 7] == 1
    assert masks[0, :, [0, 1, 4, 5, 8]].sum() == 0, "only the painted phrases' columns are set"


def test_each_recipe_adds_its_columns(pipeline):
    encoder = pipeline.encoder
    prompt = "a red circle and a blue square"  # <bos> a red circle and a blue square <eos> (<pad>)
    paint = {"red circle": (0, 0, 0.5, 0.5), "blue square": (0.5, 0.5, 1, 1)}
    union = box_mask((0, 0, 0.5, 0.5), 4).flatten() + box_mask((0.5, 0.5, 1, 1), 4).flatten()
    red = box_mask((0, 0, 0.5, 0.5), 4).flatten()
    masks = {name: token_masks(encoder, [prompt], [paint], 4, 10, name)[0] for name in RECIPES}
    eos = eos_position(encoder, prompt)
    assert eos == 8
    assert masks["paper"][:, [0, 1, 4, 5, 8, 9]].abs().sum() == 0
    assert torch.equal(masks["bos"][:, 0], 1 - union) and masks["bos"][:, 8].abs().sum() == 0
    assert torch.equal(masks["bos+eos"][:, 8], union) and torch.equal(masks["bos+eos"][:, 0], 1 - union)
    assert masks["bos+eos"][:, 9].abs().sum() == 0, "padding after <eos> is masked in attention: left alone"
    assert torch.equal(masks["full"][:, 2], 2 * red - 1), "a phrase: +1 inside its region, -1 outside"
    assert torch.equal(masks["full"][:, 2], masks["full"][:, 3]) and torch.equal(masks["full"][:, 8], union)
    between = [4, 5]  # "and a": between the two painted phrases
    assert masks["full"][:, between].abs().sum() == 0
    assert all(torch.equal(masks["full+carry"][:, j], masks["full"][:, 3]) for j in between), \
        "the words between two painted phrases take the column of the phrase before them"
    keep = [0, 1, 2, 3, 6, 7, 8, 9]
    assert torch.equal(masks["full+carry"][:, keep], masks["full"][:, keep]), "<bos> a, the phrases, <eos>: as full"
    one = token_masks(encoder, [prompt], [{"red circle": paint["red circle"]}], 4, 10, "full+carry")[0]
    assert one[:, 4:8].abs().sum() == 0, "after the last painted phrase nothing is carried: 'blue square' keeps its own"
    for name in ("bos", "bos+eos", "full", "full+carry"):
        assert torch.equal(masks[name][:, 2:4].clamp(min=0), masks["paper"][:, 2:4]), "the phrases' own part stays"
    custom = token_masks(encoder, [prompt], [paint], 4, 10, PaintRecipe(outside=0.5))[0]
    assert torch.equal(custom[:, 2], red - 0.5 * (1 - red)) and custom[:, 0].abs().sum() == 0
    assert token_masks(encoder, [prompt], [None], 4, 10, "full").abs().sum() == 0, "nothing painted: A = 0"
    with pytest.raises(UserError, match=r"choose one of paper, bos, bos\+eos, full"):
        token_masks(encoder, [prompt], [paint], 4, 10, "everything")


def test_the_bias_is_edifi_formula_on_the_conditional_rows_only():
    torch.manual_seed(0)
    layer = Attention(8, context_dim=6, heads=2, dim_head=4)
    x, context = torch.randn(4, 16, 8), torch.randn(4, 5, 6)  # rows 0-1 unconditional, 2-3 conditional
    a = torch.zeros(2, 16, 5)
    a[:, :8, 1] = 1.0  # token 1 painted over the top half
    hook = PaintHook(a, weight=0.7)
    hook.sigma, hook.rows = 3.0, slice(-2, None)
    layer.hook = hook
    out = layer(x, context, spatial=(4, 4))
    layer.hook = None
    plain = layer(x, context, spatial=(4, 4))

    q = layer.to_q(x).view(4, 16, 2, 4).transpose(1, 2)
    k = layer.to_k(context).view(4, 5, 2, 4).transpose(1, 2)
    v = layer.to_v(context).view(4, 5, 2, 4).transpose(1, 2)
    qk = q @ k.transpose(-1, -2)
    expected = []
    for b in range(4):
        scores = qk[b]
        if b >= 2:
            w = 0.7 * math.log(1 + 3.0) * scores.max()
            scores = scores + w * a[b - 2][None]
        probs = (scores / math.sqrt(4)).softmax(-1)
        expected.append((probs @ v[b]).transpose(0, 1).reshape(16, 8))
    expected = layer.to_out(torch.stack(expected))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:2], plain[:2])
    assert not torch.allclose(out[2:], plain[2:])
    w = paint_weight(torch.ones(3, 2, 4, 5) * torch.arange(1, 4.0).view(3, 1, 1, 1), 1.0, 2.0)
    assert w.flatten().tolist() == pytest.approx([2 * math.log(2) * m for m in (1, 2, 3)]), "one max per image"


def test_painting_moves_the_object_and_the_hook_is_removed(pipeline):
    from minildm.stages import judge as judge_stage

    judge = judge_stage.load(None)[0]
    prompts = ["a red circle"] * 16
    corner = {"red circle": (0.0, 0.0, 1 / 3, 1 / 3)}

    def in_corner(latents):
        return np.mean([any(o.cell == 0 for o in r) for r in judge.read(pipeline.decode(latents))])

    plain = in_corner(pipeline.sample_latents(prompts, steps=20, seed=3))
    latents, hook = sample_painted(pipeline, prompts, corner, 0.5, steps=20, seed=3, record=True, recipe="bos")
    assert in_corner(latents) >= plain + 0.25, "painted top left (rest on <bos>): the circle moves there"
    assert hook.maps and all(m[0].shape[0] == 16 for m in hook.maps.values())
    assert all(module.hook is None for module in pipeline.unet.modules() if isinstance(module, Attention))
    with pytest.raises(UserError, match="not in the prompt"):
        pipeline(["a red circle"], steps=2, paint={"blue square": (0, 0, 1, 1)})


def test_the_formula_explained_on_one_layer(pipeline):
    prompt, paint = "a red circle and a blue square", {"red circle": (0.0, 0.0, 1 / 3, 1 / 3)}
    step = explain_step(pipeline, prompt, paint, weight=1.0)
    red = step["tokens"].index("red")
    n_pixels = step["spatial"][0] * step["spatial"][1]
    assert step["a"].shape == step["scores"].shape == (n_pixels, len(step["tokens"]))
    painted_pixels = step["a"][:, red] > 0.5
    assert 0 < painted_pixels.sum() < n_pixels and step["weight"] > 0
    assert torch.allclose(step["bias"], step["weight"] * step["a"], atol=1e-5), "the bias is w·A"
    gain = step["painted"][:, red] - step["plain"][:, red]
    assert gain[painted_pixels].mean() > 0.05 and gain[painted_pixels].mean() > gain[~painted_pixels].mean()
    unpainted = explain_step(pipeline, prompt, paint, weight=0.0)  # w′ = 0 is a valid slider position
    assert unpainted["bias"].abs().max() == 0 and torch.allclose(unpainted["painted"], unpainted["plain"])


def test_paint_arguments_and_the_command_line(tmp_path, capsys):
    assert parse_paint_argument("red circle=0,0,0.5,0.5") == ("red circle", (0.0, 0.0, 0.5, 0.5))
    layout = np.zeros((32, 32, 3), np.uint8)
    layout[:16, :16] = (255, 0, 0)
    phrase, mask = parse_paint_argument("red circle=#ff0000", layout)
    assert phrase == "red circle" and mask.sum() == 256
    for bad, message in (("red circle", "PHRASE="), ("red circle=#ff0000", "needs --paint-mask"),
                         ("red circle=1,2", "x0,y0,x1,y1"), ("red circle=a,b,c,d", "four numbers")):
        with pytest.raises(UserError, match=message):
            parse_paint_argument(bad)
    with pytest.raises(UserError, match="no pixel"):
        parse_paint_argument("red circle=#00ff00", layout)
    Image.fromarray(layout).save(tmp_path / "layout.png")
    png = tmp_path / "painted.png"
    assert main(["sample", "--prompt", "a red circle", "--steps", "4", "--paint", "red circle=#ff0000",
                 "--paint-mask", str(tmp_path / "layout.png"), "--out", str(png)]) == 0
    assert png.exists()
    assert main(["sample", "--prompt", "a red circle", "--steps", "2", "--paint", "red circle=0,0,0.5,0.5",
                 "--paint-recipe", "paper", "--out", str(png)]) == 0
    assert main(["sample", "--prompt", "a red circle", "--paint", "blue square=0,0,1,1", "--out", str(png)]) == 2
    assert "not in the prompt" in capsys.readouterr().err


def test_the_painting_tasks_have_no_position_words_and_two_cells():
    tasks = paint_stage.painting_tasks(20)
    for task in tasks:
        assert not any(w in task["prompt"] for w in ("left", "right", "above", "below", " at ", "center"))
        assert len(set(task["cells"])) == 2 and set(task["paint"]) == set(task["phrases"])
    assert paint_stage.cell_box(5) == (2 / 3, 1 / 3, 1.0, 2 / 3)
    assert tasks == paint_stage.painting_tasks(20), "a pure function of the seed"


def test_a_drop_on_the_tolerance_keeps_alignment():
    plain, painted = {"alignment": 0.64375}, {"alignment": 0.59375}  # 8 prompts of 160 fewer
    assert paint_stage.alignment_drop(plain, painted) == 0.05 <= paint_stage.ALIGNMENT_TOLERANCE
    assert paint_stage.alignment_drop(plain, {"alignment": 0.5875}) > paint_stage.ALIGNMENT_TOLERANCE


def test_eval_paint_from_the_command_line(capsys):
    import json

    assert main(["eval", "paint", "--n", "4", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures["sweeps"]) == set(RECIPES) and figures["best_recipe"] in RECIPES
    assert all(set(sweep) == {f"{w:g}" for w in paint_stage.PAINT_WEIGHTS} for sweep in figures["sweeps"].values())
    best = figures["sweeps"][figures["best_recipe"]][f"{figures['best_weight']:g}"]
    assert (figures["placement"], figures["alignment"]) == (best["placement"], best["alignment"])
    assert figures["placement_paper"] in [r["placement"] for r in figures["sweeps"]["paper"].values()]
    for sweep in figures["sweeps"].values():
        for r in sweep.values():  # both objects placed: at most as often as either alone, at least the overlap
            assert max(0.0, r["placed_first"] + r["placed_second"] - 1) <= r["placement"] + 1e-9
            assert r["placement"] <= min(r["placed_first"], r["placed_second"]) + 1e-9
    assert figures["guidance"] == 7.5 and figures["at_model_guidance"]["guidance"] == 3.0
    for key in ("placement", "placement_unpainted", "alignment", "alignment_unpainted"):
        assert 0 <= figures[key] <= 1 and 0 <= figures["at_model_guidance"][key] <= 1
