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


def test_a_training_seed_reaches_every_training_run_and_nothing_else():
    profile = get_profile("cpu")
    seeded = with_training_seed(profile, 5)
    trains = [name for name, value in vars(profile).items() if isinstance(value, TrainConfig)]
    assert len(trains) == 7 and all(getattr(seeded, name).seed == 5 for name in trains)
    assert with_training_seed(seeded, 0) == profile, "seed 0 is the profile's own draw"
    assert seeded.eval_n == profile.eval_n and seeded.extras == profile.extras and seeded.ldm == profile.ldm
