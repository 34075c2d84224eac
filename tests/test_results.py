"""minildm.results: the claims table reads every number from the stages' figures, checks it
against the stages' own targets, and says plainly which claims were not met."""

import pytest

from minildm import results
from minildm.cli import main
from minildm.stages import add, experts, ldm, paint


def _figures(**overrides):
    figures = {
        "ldm": {"images_per_second": 12.0, "fid": 400.0, "alignment": 0.6, "alignment_two_object": 0.7},
        "pixel": {"images_per_second": 2.0, "fid": 800.0, "alignment": 0.2},
        "experts": {"follow_b_early": 0.9, "follow_b_late": 0.05, "follow_b_early_karras": 0.95,
                    "follow_b_late_karras": 0.02, "alignment_gain": 0.01,
                    "prompt_switch": {"0.0": 1.0, "0.5": 0.6, "0.9": 0.04, "1.0": 0.0},
                    "embeddings": {"background_distance_reference": 0.09, "background_distance_text": 0.12},
                    "interval_loss": {"loss": {"low": {"experts": 0.24, "baseline": 0.25},
                                               "all": {"experts": 0.297, "baseline": 0.300}}}},
        "paint": {"placement": 0.3, "alignment_drop": 0.02},
        "add": {"alignment_ratio_1step": 0.95, "fid_ratio_1step": 1.2, "alignment_4step_minus_1step": 0.04,
                "alignment_1step_minus_teacher_ddim_1step": 0.5, "speedup_1step": 30.0},
    }
    for key, value in overrides.items():
        stage, metric = key.split("__")
        figures[stage][metric] = value
    return figures


def _row(rows, claim):
    return next(r for r in rows if r["claim"] == claim)


def test_every_claim_gets_its_number_and_verdict():
    rows = results.claims_table(_figures())
    assert len(rows) == len(results.CLAIMS) and {r["paper"] for r in rows} == {"LDM", "eDiff-I", "ADD"}
    speed = _row(rows, "latent diffusion samples much faster than pixel diffusion")
    assert speed["ours"] == pytest.approx(6.0) and speed["met"] is True
    assert _row(rows, "at equal training compute, latent diffusion reaches better quality")["ours"] == pytest.approx(2.0)
    experts_row = _row(rows, "experts by noise interval beat one model at the same inference cost")
    assert experts_row["ours"] == pytest.approx(0.01) and experts_row["met"] is False
    assert _row(rows, "paint-with-words places objects without training")["met"] is False
    assert all(r["paper_value"] for r in rows)


def test_targets_are_the_stages_own():
    rows = {r["claim"]: r for r in results.claims_table(_figures())}
    assert rows["… and is ignored late"]["target"] == "<= {:g}".format(experts.TARGETS["follow_b_late_karras"][1])
    assert rows["text matters early in sampling …"]["target"] == ">= {:g}".format(
        experts.TARGETS["follow_b_early_karras"][1])
    assert rows["and much faster"]["target"] == ">= {:g}".format(add.TARGETS["speedup_1step"][1])
    assert rows["paint-with-words places objects without training"]["target"] == ">= {:g}".format(paint.TARGETS["placement"][1])
    two = "cross-attention makes text a condition: objects, colours, counts, relations"
    assert rows[two]["target"] == ">= {:g}".format(ldm.TARGETS["alignment_two_object"][1])


def test_a_verdict_follows_the_number():
    slow = results.claims_table(_figures(add__speedup_1step=3.0))
    assert _row(slow, "and much faster")["met"] is False
    late = results.claims_table(_figures(experts__follow_b_late_karras=0.5))
    assert _row(late, "… and is ignored late")["met"] is False
    assert _row(late, "… with the steps uniform in t")["met"] is True  # 0.05: each row reads its own curve
    uniform = results.claims_table(_figures(experts__follow_b_late=0.5))
    assert _row(uniform, "… with the steps uniform in t")["met"] is False
    assert _row(uniform, "… and is ignored late")["met"] is True
    assert _row(late, "… at the paper's granularity")["ours"] == pytest.approx(0.04)
    early = results.claims_table(_figures(experts__follow_b_early_karras=0.5))
    assert _row(early, "text matters early in sampling …")["met"] is False
    style = "a reference image's embedding carries its style into a new caption"
    assert _row(results.claims_table(_figures()), style)["ours"] == pytest.approx(0.75)
    assert _row(results.claims_table(_figures()), style)["met"] is True
    unmoved = _figures(experts__embeddings={"background_distance_reference": 0.12, "background_distance_text": 0.12})
    assert _row(results.claims_table(unmoved), style)["met"] is False
    assert _row(results.claims_table(_figures(experts__embeddings=None)), style)["ours"] is None


def test_the_denoising_row_reads_the_loss_over_every_t_and_sets_no_target():
    denoising = "… because each expert denoises its noise levels better than one network can"
    row = _row(results.claims_table(_figures()), denoising)
    assert row["ours"] == pytest.approx(-1.0) and row["target"] is None and row["met"] is None
    worse = _figures(experts__interval_loss={"loss": {"all": {"experts": 0.303, "baseline": 0.30}}})
    assert _row(results.claims_table(worse), denoising)["ours"] == pytest.approx(1.0)
    older = _figures(experts__interval_loss=None)  # figures measured before interval_loss existed
    older["experts"].pop("interval_loss")
    assert _row(results.claims_table(older), denoising)["ours"] is None


def test_markdown_marks_the_misses():
    table = results.markdown(results.claims_table(_figures()))
    lines = table.splitlines()
    assert lines[0].startswith("| paper | claim |") and len(lines) == 2 + len(results.CLAIMS)
    assert "| 6 | >= 5 | yes |" in table and "**no**" in table


def test_results_refuses_too_few_prompts(capsys):
    assert main(["results", "--profile", "smoke", "--n", "3"]) == 2
    assert "at least 6" in capsys.readouterr().err
