"""A synthetic corpus (a few Shakespeare-like words and non-ASCII ones) for the data tests."""

import json

import numpy as np

WORDS = ("the king hath sent for thee my lord and lady of the court where shall we meet "
         "again in thunder lightning or in rain what light through yonder window breaks "
         "Ælfric naïve café 42 1600").split()


def make_documents(count, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))).capitalize() + "."
                 for _ in range(rng.integers(2, 8))]
        docs.append("\n".join(lines))
    return docs


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({key: doc, "id": len(doc)}) + "\n")
    return str(path)
