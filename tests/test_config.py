"""Profiles and ``--set`` overrides."""

import pytest

from minildm.config import TrainConfig, get_profile, with_overrides, with_training_seed
from minildm.errors import UserError


def test_set_reaches_nested_fields_and_the_profiles_extras():
    profile = with_overrides(get_profile("cpu"), ["experts_train.steps=225", "extras.multi_embedding_steps=900",
                                                  "ldm.unet.channel_mult=[1,2]"])
    assert profile.experts_train.steps == 225 and profile.extras["multi_embedding_steps"] == 900
    assert profile.ldm.unet.channel_mult == (1, 2)
    assert get_profile("cpu").extras["multi_embedding_steps"] == 1800, "the profile itself is unchanged"
    smoke = with_overrides(get_profile("smoke"), ["extras.multi_embedding_steps=3"])  # a key another profile names
    assert smoke.extras["multi_embedding_steps"] == 3


@pytest.mark.parametrize("assignment, message", [
    ("extras.no_such_budget=3", "no profile has an extra 'no_such_budget'; extras: add_cache_size"),
    ("experts_train.no_such_field=3", "experts_train has no field 'no_such_field'"),
    ("nowhere.steps=3", "expected SECTION.FIELD=VALUE"),
])
def test_an_unknown_setting_is_one_clear_error(assignment, message):
    with pytest.raises(UserError, match=message):
        with_overrides(get_profile("cpu"), [assignment])


@pytest.mark.parametrize("assignment, message", [
    ("ldm_train.steps=abc", "ldm_train.steps takes a whole number, like its present value 3000"),
    ("ldm_train.steps=2.5", "ldm_train.steps takes a whole number"),
    ("ldm_train.compile=1", "ldm_train.compile takes true or false, like its present value false"),
    ("ldm_train.betas=[0.9]", "ldm_train.betas takes a list of 2 numbers, like its present value \\[0.9, 0.999\\]"),
    ("ae.channel_mult=[1,\"x\"]", "ae.channel_mult takes a list of whole numbers"),
    ("ldm.unet=96", "ldm.unet is a section; set one of its fields: in_channels"),
    ("extras.multi_embedding_steps=many", "extras.multi_embedding_steps takes a whole number, like its present value 1800"),
    ("ldm_train.batch_size=0", "batch_size must be at least 1"),
    ("ldm_train.lr=-1e-3", "lr must be above 0"),
    ("ldm_train.ema_decay=1", "ema_decay must be at least 0 and below 1"),
    ("ldm_train.seed=-1", "seed must be from 0 to 4294967295"),
    ("ldm_train.mixed_precision=fp8", "mixed_precision must be one of no, bf16, fp16, auto, auto-native"),
])
def test_a_value_of_the_wrong_type_or_range_is_one_clear_error(assignment, message):
    with pytest.raises(UserError, match=f"--set .*: {message}"):
        with_overrides(get_profile("cpu"), [assignment])


def test_set_values_take_their_fields_types():
    profile = with_overrides(get_profile("cpu"), [
        "ldm_train.lr=1", "ldm_train.max_train_seconds=null", "pixel_train.max_train_seconds=90",
        "ldm_train.render_workers=2", "ldm_train.mixed_precision=bf16", "extras.experts_split=flat"])
    assert profile.ldm_train.lr == 1.0 and isinstance(profile.ldm_train.lr, float), "a float field stays a float"
    assert profile.ldm_train.max_train_seconds is None and profile.pixel_train.max_train_seconds == 90.0
    assert profile.ldm_train.render_workers == 2 and profile.ldm_train.mixed_precision == "bf16"
    assert profile.extras["experts_split"] == "flat"


def test_a_training_config_refuses_values_no_run_can_train_with():
    with pytest.raises(ValueError, match="steps must be at least 1; batch_size must be at least 1"):
        TrainConfig(steps=0, batch_size=0)
    TrainConfig(steps=1, batch_size=1, warmup_steps=0, ema_decay=0.0)  # the smallest run there is


def test_a_training_seed_reaches_every_training_run_and_nothing_else():
    profile = get_profile("cpu")
    seeded = with_training_seed(profile, 5)
    trains = [name for name, value in vars(profile).items() if isinstance(value, TrainConfig)]
    assert len(trains) == 7 and all(getattr(seeded, name).seed == 5 for name in trains)
    assert with_training_seed(seeded, 0) == profile, "seed 0 is the profile's own draw"
    assert seeded.eval_n == profile.eval_n and seeded.extras == profile.extras and seeded.ldm == profile.ldm
