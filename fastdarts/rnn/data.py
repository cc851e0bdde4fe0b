"""Word-level language-modelling data (RNN.md 3): a corpus of three token streams and their batches.

`load_corpus(None)` reads the bundled corpus (fastdarts/data/pydoc_ptb, built from Python's own
documentation, about 51k tokens); `load_corpus(DIR)` reads `train.txt`, `valid.txt`, `test.txt`
(DARTS's `data/penn`) or `ptb.train.txt`, `ptb.valid.txt`, `ptb.test.txt` (the original PTB names).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DataError, path_stat

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "pydoc_ptb"
SPLITS = ("train", "valid", "test")
# The file names of each split: DARTS's data/penn, then the original PTB distribution's.
FILE_NAMES = ({s: f"{s}.txt" for s in SPLITS}, {s: f"ptb.{s}.txt" for s in SPLITS})
EOS = "<eos>"


@dataclass
class Dictionary:
    """Word ids in order of first occurrence."""

    word2idx: dict[str, int] = field(default_factory=dict)
    idx2word: list[str] = field(default_factory=list)

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.idx2word)


@dataclass
class Corpus:
    """The three splits as flat id streams, over one dictionary built on train, then valid, then test."""

    dictionary: Dictionary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    source: str


def tokenize(path: Path, dictionary: Dictionary) -> torch.Tensor:
    """Every line's whitespace-separated words and an `<eos>`, as one id stream."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    ids = [dictionary.add_word(word) for line in text.splitlines() for word in (*line.split(), EOS)]
    if len(ids) < 2:
        raise DataError(f"{path}: holds no text")
    return torch.tensor(ids, dtype=torch.long)


def corpus_files(directory: str | Path) -> dict[str, Path]:
    """The split files in `directory`, under either naming convention."""
    root = Path(directory)
    found = path_stat(root, "data", DataError)
    if found is None:
        raise DataError(f"data {root} does not exist")
    if not stat.S_ISDIR(found.st_mode):
        raise DataError(f"data {root} is not a directory")
    for names in FILE_NAMES:
        paths = {s: root / name for s, name in names.items()}
        if all(path_stat(p, "data", DataError) is not None for p in paths.values()):
            return paths
    raise DataError(f"data {root} must hold train.txt, valid.txt and test.txt (or ptb.train.txt, ptb.valid.txt "
                    "and ptb.test.txt)")  # fmt: skip


def load_corpus(directory: str | Path | None = None) -> Corpus:
    """The corpus in `directory`, or the bundled one."""
    paths = corpus_files(BUNDLED if directory is None else directory)
    dictionary = Dictionary()
    streams = {s: tokenize(paths[s], dictionary) for s in SPLITS}
    return Corpus(dictionary, **streams, source="bundled pydoc corpus" if directory is None else str(directory))


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`(rows, batch_size)`: column b is the b-th contiguous slice of `data`; the tail is dropped."""
    rows = len(data) // batch_size
    if rows < 2:
        raise DataError(f"{len(data)} tokens make fewer than 2 rows of a batch of {batch_size}")
    return data[: rows * batch_size].view(batch_size, rows).t().contiguous()


def get_batch(source: torch.Tensor, i: int, seq_len: int = 35) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `i .. i+L-1` and the next word of each, `L = min(seq_len, rows - 1 - i)`: `(L, B)` and `(L*B,)`."""
    length = min(seq_len, len(source) - 1 - i)
    return source[i : i + length], source[i + 1 : i + 1 + length].reshape(-1)
