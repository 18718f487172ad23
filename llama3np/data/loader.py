"""Training data: documents -> token stream -> fixed-length rows -> a deterministic, resumable loader.

    docs:    ["Once upon a time ...", "Once upon a time ...", ...]
    stream:  BOS doc0 EOS BOS doc1 EOS BOS doc2 EOS ...                    (one long int32 array)
    rows:    stream[0 : T+1], stream[T : 2T+1], stream[2T : 3T+1], ...     (neighbours share one token)
    batch:   x = rows[:, :-1], y = rows[:, 1:]                             (predict the next token)

Packing documents back to back wastes no compute on padding; BOS/EOS mark where one document ends and
the next begins, so the model learns not to carry one story into the next. Rows overlap by one token
so that every token of the stream except the first is a target exactly once per epoch (that is also
the count the entropy floor divides by, see stories.py).

The loader visits the rows in an order shuffled by (seed, epoch); its whole position is two integers
(epoch, index in the epoch), saved in every checkpoint, so a resumed run reads the same batches.
"""
from pathlib import Path

import numpy as np

from ..fileio import atomic_write

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
DOC_SEPARATOR = "<|end_of_text|>"  # a line holding only this splits a file into several documents


# ---------------------------------------------------------------------------------------------------
# documents
def read_documents(path):
    """Read a text file or a folder of them (*.txt, *.md, *.text, *.rst, recursively, sorted) -> docs.

    A file is one document, unless it has lines holding only `<|end_of_text|>`, which separate
    documents. JSONL files (*.jsonl: one JSON object per line with a string "text", as
    `llama3np data curate` writes in OUT/kept/) give one document per line; a curation output folder
    (one holding kept/ and removed/) is read from kept/ only. Empty documents are dropped.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus path not found: {path}")
    if path.is_dir() and (path / "kept").is_dir() and (path / "removed").is_dir():
        path = path / "kept"  # a curated folder: train on what the pipeline kept
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + (".jsonl",))
        if not files:
            raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES + ('.jsonl',))}) found under {path}")
    else:
        files = [path]
    docs = []
    for f in files:
        if f.suffix.lower() == ".jsonl":
            docs.extend(d["text"].strip("\n") for _, d in read_jsonl(f) if d["text"].strip())
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text ({e})") from None
        parts = split_on_separator(text)
        docs.extend(p.strip("\n") for p in parts if p.strip())
    if not docs:
        raise ValueError(f"the corpus at {path} holds no text")
    return docs


def read_jsonl(path):
    """(line number, object) for every non-blank line of a JSONL file (.gz too), each a JSON object with
    a string "text" (datatrove's and Hugging Face datasets' shape); a bad line is an error naming the
    file and the line."""
    import gzip
    import json

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                d = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
            if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
            yield lineno, d


def split_on_separator(text):
    """A file's text -> its documents: split at lines holding only <|end_of_text|> (or the whole text)."""
    if DOC_SEPARATOR not in text:
        return [text]
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if line.strip() == DOC_SEPARATOR:
            docs.append("".join(current))
            current = []
        else:
            current.append(line)
    docs.append("".join(current))
    return docs


def train_val_split(docs, val_fraction=0.05):
    """Every k-th document (k = round(1 / val_fraction)) goes to validation; at least one each side.

    A deterministic interleaved split rather than "the last 5%": the end of a corpus is often
    different from the rest (later chapters, newer files). A single document is cut at a line break
    near the (1 - val_fraction) point instead.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) == 1:
        text = docs[0]
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
        cut = cut if cut > 0 else int(len(text) * (1 - val_fraction))
        if cut <= 0 or cut >= len(text):
            raise ValueError("the corpus is too short to split into training and validation text")
        return [text[:cut]], [text[cut:]]
    k = max(2, round(1 / val_fraction))
    train = [d for i, d in enumerate(docs) if i % k != k - 1]
    val = [d for i, d in enumerate(docs) if i % k == k - 1] or [docs[-1]]
    return train, val


# ---------------------------------------------------------------------------------------------------
# tokens
def train_bpe(text, vocab_size):
    """A BPE tokenizer trained on `text` with vocab_size ids, or fewer if the text runs out of pairs.

    A small grammar has only a few hundred distinct words: once every word is a single token there
    is nothing left to merge, and a bigger vocabulary would only add embedding rows never used.
    """
    from .. import bpe

    try:
        return bpe.train(text, vocab_size, name="bpe")
    except bpe.OutOfPairs as e:  # says how many ids the text supports
        return bpe.train(text, e.max_vocab_size, name="bpe")


def tokenize_documents(tokenizer, docs):
    """-> (stream, doc_lengths): BOS doc EOS for each doc, concatenated (int32); lengths without BOS/EOS."""
    pieces, lengths = [], []
    bos, eos = np.array([tokenizer.bos_id], np.int32), np.array([tokenizer.eos_id], np.int32)
    for doc in docs:
        ids = np.asarray(tokenizer.encode(doc, bos=False, eos=False), dtype=np.int32)
        pieces += [bos, ids, eos]
        lengths.append(len(ids))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return stream, np.asarray(lengths, dtype=np.int64)


def n_rows(stream_len, seq_len):
    """How many rows of seq_len + 1 tokens (neighbours overlapping by one) fit in the stream."""
    return max(0, (stream_len - 1) // seq_len)


def get_rows(stream, seq_len, idx):
    """Rows idx (ints) of the stream -> (len(idx), seq_len + 1) int64; row i = stream[i*T : i*T + T + 1]."""
    idx = np.asarray(idx, dtype=np.int64)
    offsets = idx[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # (n, T+1)
    return stream[offsets].astype(np.int64)


class DataLoader:
    """Batches of (x, y), each (batch_size, seq_len), in an order shuffled per epoch; resumable.

    The order of epoch e is a permutation drawn from np.random.default_rng([seed, e]), so it depends
    on nothing but (seed, epoch). The rows left over at the end of an epoch (fewer than a batch) are
    skipped, and the next epoch begins with a new permutation.
    """

    def __init__(self, stream, seq_len, batch_size, seed=0):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        self.stream = np.asarray(stream)
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.n_rows = n_rows(len(self.stream), self.seq_len)
        if self.n_rows < self.batch_size:
            raise ValueError(
                f"the training data ({len(self.stream)} tokens) holds {self.n_rows} rows of seq_len={seq_len}, "
                f"fewer than one batch of {batch_size}: use more data or a smaller --batch-size/--seq-len")
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = None, None

    def _permutation(self):
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_rows)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self):
        if self.pos + self.batch_size > self.n_rows:
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._permutation()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        rows = get_rows(self.stream, self.seq_len, idx)  # (B, T+1)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state):
        if int(state["seed"]) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def eval_batches(stream, seq_len, batch_size, max_rows=None):
    """All rows in order (or the first max_rows), as (x, y) batches; the last batch may be smaller."""
    total = n_rows(len(stream), seq_len)
    total = total if max_rows is None else min(total, max_rows)
    for start in range(0, total, batch_size):
        rows = get_rows(stream, seq_len, np.arange(start, min(total, start + batch_size)))
        yield rows[:, :-1], rows[:, 1:]


def save_arrays_atomic(path, **arrays):
    """np.savez, written atomically (see llama3np.fileio)."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def document_ids(rows, bos_id):
    """rows (B, T) of the packed stream -> (B, T) ints: which document of its row each token belongs to.

    Every document starts with BOS, so the count of BOS tokens up to and including a position names
    its document (a row that starts mid-document has id 0 until its first BOS). With these ids the
    model's document-masked attention keeps each document to itself (`forward(..., doc_ids=...)`).
    """
    rows = np.asarray(rows)
    return np.cumsum(rows == bos_id, axis=1)
