"""The fixed evaluation prompt set, ``data/prompts/eval.jsonl``, used by every stage's eval.

One JSON object per line: ``prompt``, ``category`` and ``clauses`` (the parse of the prompt,
stored so that a reader sees what will be checked). The set is built by
:func:`build_evaluation_prompts` from scenes of a dedicated stream, each distinct prompt once,
up to a quota per category (``colors`` has only 24 distinct prompts in this world:
6 colours × 4 shapes). ``python -m minildm.data.prompts`` rewrites the file; a test checks
that the committed file is exactly what the code builds.
"""

from __future__ import annotations

import json
from pathlib import Path

from minildm.config import ShapesConfig
from minildm.data.captions import category_caption, parse
from minildm.data.shapes import CATEGORIES, make_scene

PROMPT_SEED = 2_000_003
PROMPTS_PER_CATEGORY = {"single_object": 48, "two_object": 48, "counting": 48, "colors": 24,
                        "position": 80, "color_attr": 80}
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "data" / "prompts" / "eval.jsonl"


def build_evaluation_prompts(per_category: dict[str, int] = PROMPTS_PER_CATEGORY) -> list[dict]:
    """Distinct category captions of the prompt stream, in a fixed order, with their clauses."""
    records = []
    for k, category in enumerate(CATEGORIES):
        seen, index = set(), 0
        while len(seen) < per_category[category]:
            scene = make_scene(PROMPT_SEED + k, index, ShapesConfig(), category=category)
            prompt = category_caption(scene)
            index += 1
            if index > 100_000:
                raise RuntimeError(f"only {len(seen)} distinct {category} prompts exist")
            if prompt in seen:
                continue
            seen.add(prompt)
            records.append({"prompt": prompt, "category": category, "clauses": parse(prompt).to_dict()})
    return records


def load_evaluation_prompts(path: Path | str = DEFAULT_PATH) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_evaluation_prompts(path: Path | str = DEFAULT_PATH) -> int:
    records = build_evaluation_prompts()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return len(records)


if __name__ == "__main__":
    print(f"wrote {write_evaluation_prompts()} prompts to {DEFAULT_PATH}")
