from collections import Counter

from minildm.data.captions import Clauses, parse
from minildm.data.prompts import DEFAULT_PATH, build_evaluation_prompts, load_evaluation_prompts
from minildm.data.shapes import CATEGORIES


def test_committed_prompt_set_is_what_the_code_builds():
    assert load_evaluation_prompts() == build_evaluation_prompts(), \
        f"regenerate with: python -m minildm.data.prompts ({DEFAULT_PATH})"


def test_prompt_set_size_categories_and_clauses():
    records = load_evaluation_prompts()
    assert len(records) >= 300
    counts = Counter(r["category"] for r in records)
    assert set(counts) == set(CATEGORIES) and min(counts.values()) >= 20
    assert len({r["prompt"] for r in records}) == len(records), "each prompt once"
    for r in records:
        assert Clauses.from_dict(r["clauses"]) == parse(r["prompt"])


def test_position_prompts_name_a_relation_and_others_do_not():
    for r in load_evaluation_prompts():
        has_relation = parse(r["prompt"]).relation is not None
        assert has_relation == (r["category"] == "position")
