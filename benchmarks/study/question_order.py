"""Does a model answer a question about a picture as well when the question comes after the picture? The same
held-out shapes VQA questions asked three ways, answered greedily and scored as the shapes suite scores VQA:

    question-first   "Question: Q" [picture] "Answer:"      (the pretraining layout, data/shapes/tasks.py)
    image-first      [picture] "Question: Q" "Answer:"      (never trained: plain text after the picture)
    chat             user turn [picture] "Q", then the assistant's reply (the model's chat template)

A model that reads the picture with the question in mind (question-first) and one that must find the answer
in a picture it read blind (chat) differ most on "where" questions: the question after the picture has to
recover an object's cell from its codes (docs/instruct.md, twentieth session).

    python benchmarks/study/question_order.py runs/sft-tokens --num 300 --json order.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from mixmodal.data.shapes import ShapesConfig, shapes_document
from mixmodal.documents import Document, Text
from mixmodal.eval.text_metrics import normalize_answer
from mixmodal.inference.config import GenerationConfig, SamplingParams
from mixmodal.inference.engine import Engine

FORMS = {
    "question-first": lambda q, picture: Document([Text(f"Question: {q}"), picture, Text("Answer:")]),
    "image-first": lambda q, picture: Document([picture, Text(f"Question: {q}"), Text("Answer:")]),
    "chat": lambda q, picture: Document([picture, Text(q)], {"turns": [["user", 2]]}),
}


def questions(num: int, resolution: int) -> list[Document]:
    """The shapes suite's held-out VQA documents ("Question: Q", picture, "Answer: A"; metadata has the rest)."""
    world = ShapesConfig(resolution=resolution, max_objects=4, tasks=["vqa"])
    return [shapes_document(world, "heldout", i) for i in range(num)]


def accuracy(engine, docs: list[Document], form: str, batch_size: int = 32) -> dict[str, dict]:
    """Accuracy (and n) overall and by question type, with the questions laid out as `form`."""
    gen = GenerationConfig(mode="text", max_images=0, max_new_tokens=12, text=SamplingParams(temperature=0.0))
    prompts = [FORMS[form](d.metadata["question"], d.parts[1]) for d in docs]
    results = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        results += engine.generate(chunk, gen, seed=list(range(s, s + len(chunk))))
    groups: dict[str, list[bool]] = defaultdict(list)
    for doc, result in zip(docs, results):
        right = normalize_answer(" ".join(result.document.texts).strip()) == normalize_answer(doc.metadata["answer"])
        groups["all"].append(right)
        groups[doc.metadata["question_type"]].append(right)
    return {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run or model folder")
    parser.add_argument("--num", type=int, default=300, help="held-out questions")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args(argv)
    engine = Engine.from_pretrained(args.run)
    docs = questions(args.num, engine.image_tokenizer.config.resolution)
    table = {form: accuracy(engine, docs, form) for form in args.forms}
    kinds = sorted({k for row in table.values() for k in row if k != "all"})
    print(f"{args.run}: {args.num} held-out VQA questions, three layouts")
    print("| layout | all | " + " | ".join(kinds) + " |\n|---|---|" + "---|" * len(kinds))
    for form, row in table.items():
        print(f"| {form} | {row['all']['accuracy']:.3f} | "
              + " | ".join(f"{row[k]['accuracy']:.2f} ({row[k]['n']})" for k in kinds) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"run": args.run, "num": args.num, "forms": table}, f, indent=1)
    return table


if __name__ == "__main__":
    main()
