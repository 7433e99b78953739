"""Tiny dataset files in the Hugging Face Hub schema, for running the suites offline.

`write_fixtures(root)` lays them out the way `--data-dir root` expects
(`root/<task>/<split>.jsonl`, or `root/<task>.jsonl` for the evaluation split) and covers
both file kinds the loader reads (JSONL and Parquet):

- gsm8k (openai/gsm8k, config main): test + train, `question` / `answer` ("... #### N").
- mmlu abstract_algebra (cais/mmlu): test + dev, `question`, `subject`, `choices` (4), `answer` (0-3).
- LongBench (THUDM/LongBench): qasper (flat `qasper.jsonl`), trec (`trec/test.jsonl`, with
  `all_classes`) and multifieldqa_zh (`multifieldqa_zh/test.parquet`, Chinese), each row with
  `input`, `context`, `answers`, `length`, `dataset`, `language`, `all_classes`, `_id`.

Prompts are kept to a few dozen tokens so that the real embedded model runs them in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GSM8K_TEST = [
    {"question": "Tom has 2 apples and buys 3 more. How many apples does he have?",
     "answer": "Tom has 2 + 3 = <<2+3=5>>5 apples.\n#### 5"},
    {"question": "A box holds 4 pens. How many pens are in 2 boxes?",
     "answer": "2 boxes hold 2 * 4 = <<2*4=8>>8 pens.\n#### 8"},
    {"question": "Sara had 10 sweets and ate 3. How many are left?",
     "answer": "10 - 3 = <<10-3=7>>7 sweets are left.\n#### 7"},
    {"question": "A bus has 6 seats in each row and 5 rows. How many seats?",
     "answer": "6 * 5 = <<6*5=30>>30 seats.\n#### 30"},
    {"question": "Ann reads 9 pages a day. How many pages in 2 days?",
     "answer": "9 * 2 = <<9*2=18>>18 pages.\n#### 18"},
    {"question": "There are 12 eggs and 4 are broken. How many are whole?",
     "answer": "12 - 4 = <<12-4=8>>8 eggs.\n#### 8"},
    {"question": "A cat has 4 legs. How many legs do 3 cats have?",
     "answer": "3 * 4 = <<3*4=12>>12 legs.\n#### 12"},
    {"question": "Max saves 5 dollars a week. How much after 4 weeks?",
     "answer": "5 * 4 = <<5*4=20>>20 dollars.\n#### 20"},
]
GSM8K_TRAIN = [
    {"question": "Bob has 1 ball and finds 1 more. How many balls does he have?",
     "answer": "1 + 1 = <<1+1=2>>2 balls.\n#### 2"},
    {"question": "Each hand has 5 fingers. How many fingers on 2 hands?",
     "answer": "2 * 5 = <<2*5=10>>10 fingers.\n#### 10"},
]

MMLU_SUBJECT = "abstract_algebra"
MMLU_TEST = [
    {"question": "What is 2 + 2?", "subject": MMLU_SUBJECT, "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "Which number is even?", "subject": MMLU_SUBJECT, "choices": ["7", "9", "8", "11"], "answer": 2},
    {"question": "What is 3 * 3?", "subject": MMLU_SUBJECT, "choices": ["9", "6", "12", "3"], "answer": 0},
]
MMLU_DEV = [
    {"question": "What is 1 + 1?", "subject": MMLU_SUBJECT, "choices": ["1", "3", "4", "2"], "answer": 3},
    {"question": "What is 5 - 2?", "subject": MMLU_SUBJECT, "choices": ["3", "2", "1", "0"], "answer": 0},
]

TREC_CLASSES = ["Abbreviation", "Description", "Entity", "Human", "Location", "Numeric value", "Date"]


def _longbench(dataset: str, language: str, rows: list[tuple[str, str, list[str]]],
               all_classes: list[str] | None = None) -> list[dict[str, Any]]:
    return [{"input": question, "context": context, "answers": answers, "length": len(context.split()),
             "dataset": dataset, "language": language, "all_classes": all_classes, "_id": f"{dataset}-{i:03d}"}
            for i, (question, context, answers) in enumerate(rows)]


QASPER = _longbench("qasper", "en", [
    ("What dataset do the authors use?",
     "We evaluate our model on the SQuAD dataset. Results show gains of two points over the baseline.",
     ["SQuAD", "the SQuAD dataset"]),
    ("How many layers does the model have?",
     "Our encoder has twelve layers and the decoder has six layers. Training takes one day.",
     ["twelve"]),
    ("Which language is studied?",
     "All experiments use German news text collected in 2019.",
     ["German"]),
])
TREC = _longbench("trec", "en", [
    ("Question: Who wrote Hamlet?\nType:",
     "Question: What does NASA stand for?\nType: Abbreviation\nQuestion: Where is Paris?\nType: Location",
     ["Human"]),
    ("Question: When did the war end?\nType:",
     "Question: Who painted the Mona Lisa?\nType: Human\nQuestion: How many legs has a spider?\nType: Numeric value",
     ["Date"]),
], all_classes=TREC_CLASSES)
MULTIFIELDQA_ZH = _longbench("multifieldqa_zh", "zh", [
    ("北京是哪个国家的首都？", "北京是中华人民共和国的首都，也是全国的政治和文化中心。", ["中国"]),
    ("长江有多长？", "长江全长约六千三百公里，是中国最长的河流。", ["约六千三百公里"]),
])


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_fixtures(root: Path) -> Path:
    """Write every fixture under `root` (the folder to pass as --data-dir); return it."""
    write_jsonl(root / "gsm8k" / "test.jsonl", GSM8K_TEST)
    write_jsonl(root / "gsm8k" / "train.jsonl", GSM8K_TRAIN)
    write_jsonl(root / MMLU_SUBJECT / "test.jsonl", MMLU_TEST)
    write_jsonl(root / MMLU_SUBJECT / "dev.jsonl", MMLU_DEV)
    write_jsonl(root / "qasper.jsonl", QASPER)
    write_jsonl(root / "trec" / "test.jsonl", TREC)
    write_parquet(root / "multifieldqa_zh" / "test.parquet", MULTIFIELDQA_ZH)
    return root


if __name__ == "__main__":
    import sys

    print(write_fixtures(Path(sys.argv[1] if len(sys.argv) > 1 else "fixture-data")))
