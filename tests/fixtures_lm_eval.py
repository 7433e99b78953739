"""Small offline lm-eval tasks (local JSONL through `dataset_path: json`), written into a temp folder.

- `arkv_fx_gen`: generate_until, exact match, stop at a newline; the first prompt is long
  (about 200 tokens), so a tiny cache_size has to compress it.
- `arkv_fx_mc`: multiple choice (loglikelihood), accuracy.
- `arkv_fx_roll`: loglikelihood_rolling, perplexity.
- `arkv_fx_hub`: a task whose data lives on the Hub (for the offline error).
"""

from __future__ import annotations

import json
from pathlib import Path

STORY = ("Mara kept a small garden behind the old mill. Every spring she planted beans, tomatoes and a row of "
         "sunflowers along the fence. The miller's cat slept in the shade of the tallest sunflower, and the "
         "children from the village came by after school to count the bees. One year a storm broke the fence, "
         "and the neighbours helped her mend it with wood from the mill. ")

GEN = [
    {"question": STORY * 2 + "Question: What did Mara plant along the fence?", "answer": "sunflowers"},
    {"question": "Question: What is the capital of France?", "answer": "Paris"},
    {"question": "Question: How many legs does a spider have?", "answer": "eight"},
]
MC = [
    {"question": STORY + "Where did the cat sleep?", "choices": ["in the shade of a sunflower", "on the roof",
                                                                  "in the river"], "label": 0},
    {"question": "What colour is the sky on a clear day?", "choices": ["blue", "green", "purple"], "label": 0},
    {"question": "Which animal barks?", "choices": ["a cat", "a dog", "a fish"], "label": 1},
]
ROLL = [{"text": STORY}, {"text": "The quick brown fox jumps over the lazy dog. " * 3}]


def _task(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}metadata:\n  version: 1.0\n")


def write_tasks(folder: Path) -> Path:
    """Write the fixture tasks (YAML + JSONL) into `folder`; return it (lm-eval's include_path)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("gen", GEN), ("mc", MC), ("roll", ROLL)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "arkv_fx_gen.yaml").write_text(_task("arkv_fx_gen", folder / "gen.jsonl", (
        "output_type: generate_until\n"
        "doc_to_text: \"{{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\", \"Question:\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "    ignore_case: true\n    ignore_punctuation: true\n    regexes_to_ignore: [\" \"]\n")))
    (folder / "arkv_fx_mc.yaml").write_text(_task("arkv_fx_mc", folder / "mc.jsonl", (
        "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")))
    (folder / "arkv_fx_roll.yaml").write_text(_task("arkv_fx_roll", folder / "roll.jsonl", (
        "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")))
    (folder / "arkv_fx_hub.yaml").write_text(
        "task: arkv_fx_hub\ndataset_path: arkv-bench-test/no-such-dataset\noutput_type: generate_until\n"
        "test_split: test\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder
