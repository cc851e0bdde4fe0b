"""Builds the bundled language-modelling corpus from CPython's `pydoc_data.topics` (RNN.md 3.4).

`python -m fastdarts.rnn.pydoc_corpus OUT_DIR` writes `train.txt`, `valid.txt` and `test.txt` in Penn
Treebank's format: one lower-cased, tokenised sentence per line with a leading space, numbers as `N`, a
closed vocabulary with `<unk>`. The text of `pydoc_data` changes with every Python release, so the package
ships the files this wrote (fastdarts/data/pydoc_ptb/, from Python 3.11.7) instead of building them at run time.
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

DROPPED_LINE = re.compile(r"^(   |\t)|^[+|]|[=\-~^*]{4,}")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
TOKEN = re.compile(r"[a-z_][a-z0-9_]*(?:'[a-z]+)?|\d+(?:\.\d+)?|[^\sa-z0-9_]")
MIN_PARAGRAPH_WORDS, MIN_TOKENS, MAX_TOKENS = 4, 3, 100
SPLITS = (("train", 0.8), ("valid", 0.1), ("test", 0.1))


def sentences(topics: dict[str, str]) -> list[list[str]]:
    """The tokenised sentences of every topic's prose, topics in name order."""
    found = []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = [line for line in paragraph.split("\n") if line.strip() and not DROPPED_LINE.search(line)]
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) < MIN_PARAGRAPH_WORDS:
                continue
            for sentence in SENTENCE_END.split(text):
                tokens = ["N" if token[0].isdigit() else token for token in TOKEN.findall(sentence.lower())]
                if MIN_TOKENS <= len(tokens) <= MAX_TOKENS:
                    found.append(tokens)
    return found


def split(found: list[list[str]]) -> dict[str, list[list[str]]]:
    """Contiguous 80/10/10 % of the tokens, cut at sentence boundaries (whole topics stay together)."""
    total = sum(len(s) + 1 for s in found)
    parts, start, seen = {}, 0, 0
    for n, (name, _) in enumerate(SPLITS):
        end = start
        target = total * sum(f for _, f in SPLITS[: n + 1])
        while end < len(found) and (seen + len(found[end]) + 1 <= target or n == len(SPLITS) - 1):
            seen += len(found[end]) + 1
            end += 1
        parts[name], start = found[start:end], end
    return parts


def close_vocabulary(parts: dict[str, list[list[str]]], min_count: int = 2) -> None:
    """Words seen fewer than `min_count` times in train, and words never seen there, become `<unk>`."""
    counts = collections.Counter(token for sentence in parts["train"] for token in sentence)
    keep = {token for token, count in counts.items() if count >= min_count}
    for sentences_ in parts.values():
        for sentence in sentences_:
            sentence[:] = [token if token in keep else "<unk>" for token in sentence]


def main(argv=None) -> int:
    from pydoc_data.topics import topics

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fastdarts.rnn.pydoc_corpus OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    parts = split(sentences(topics))
    close_vocabulary(parts)
    for name, part in parts.items():
        (out / f"{name}.txt").write_text("".join(" " + " ".join(s) + " \n" for s in part))
        print(f"{name}: {len(part)} lines, {sum(len(s) + 1 for s in part)} tokens with <eos>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
