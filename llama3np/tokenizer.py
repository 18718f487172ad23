"""Llama 3's tokenizer: byte-level BPE (run by tiktoken) plus 256 special tokens, and the chat format.

How Llama 3 turns text into ids, in three steps:
  1. Pre-tokenize: split the text into chunks with `PAT_STR` (words with their leading space, numbers
     of at most 3 digits, runs of punctuation, runs of whitespace). Merges never cross a chunk boundary.
  2. BPE inside each chunk: start from the chunk's UTF-8 bytes and repeatedly merge the adjacent pair
     whose concatenation has the lowest rank in the vocabulary, until no adjacent pair is in it.
     The rank of a token is its id.
  3. Special tokens (`<|begin_of_text|>`, `<|eot_id|>`, ...) get the ids right after the BPE ranks.
     They are never produced from ordinary text unless explicitly allowed.

The vocabulary file (`tokenizer.model`, tiktoken's format) is plain text, one token per line:
the token's bytes in base64, a space, its rank. Meta's file has 128,000 lines (ranks 0..127999), so
the special tokens are 128000..128255 and the model's vocabulary has 128,256 rows. We parse the file
ourselves (see `parse_model_file`) and hand the ranks to tiktoken, whose Rust code does steps 1-2 fast.

This mirrors Meta's `llama_models/llama3/tokenizer.py` (same names, same special-token list, same
chunking of very long inputs) so ids agree with Meta's byte for byte; the tests check that.
"""
import base64
import binascii
import importlib.util
import os
import re
from pathlib import Path
from typing import AbstractSet, Collection, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import tiktoken

from .fileio import atomic_write_bytes

# Llama 3's pre-tokenizer pattern (Meta's `pat_str`). Unlike GPT-2's it is case-insensitive on
# contractions, lets one non-letter lead a word (" hello", "$hello"), and caps digit runs at 3.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256

# tiktoken's Rust encoder can panic above ~400k characters in one call, so Meta encodes in slices.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# ...and its regex backtracks badly on very long runs of whitespace or of non-whitespace
# (https://github.com/openai/tiktoken/issues/195), so Meta also cuts such runs every 25,000 chars.
MAX_NO_WHITESPACES_CHARS = 25_000


def special_token_names() -> List[str]:
    """The 256 special tokens in id order, exactly as Meta's llama-models names them.

    The first 12 have roles (chat headers, end of turn, tool calls, padding, images); the rest are
    `<|reserved_special_token_{2 + i}|>`, numbered after the two reserved tokens among the first 12.
    """
    named = [
        "<|begin_of_text|>",  # +0: BOS, once at the start of every sequence
        "<|end_of_text|>",  # +1: EOS for base models
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",  # +4: padding (Meta's pad_id)
        "<|step_id|>",
        "<|start_header_id|>",  # +6: chat: <|start_header_id|>role<|end_header_id|>
        "<|end_header_id|>",
        "<|eom_id|>",  # +8: end of message (the model expects a tool result next)
        "<|eot_id|>",  # +9: end of turn
        "<|python_tag|>",  # +10: the reply is a tool call
        "<|image|>",
    ]
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(named))]
    return named + reserved


def default_model_path() -> Path:
    """Where the installed `llama-models` package keeps Meta's Llama 3 `tokenizer.model`.

    `find_spec` locates the package without importing it (importing it pulls in pydantic, PIL, ...).
    """
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Llama 3's tokenizer.model ships with the `llama-models` package, which is not installed: "
            "pip install llama-models (or pass the path of a tokenizer.model to Tokenizer(path))"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"


def parse_model_file(text: str, source: str = "<string>") -> Dict[bytes, int]:
    """Parse tiktoken's `.model` format: one `base64(token) rank` per line -> {token bytes: rank}.

    Blank lines are skipped (as tiktoken does). The ranks must be exactly 0..N-1 with every one of
    the 256 single bytes among the tokens: byte-level BPE starts from single bytes, so without them
    some text could not be encoded, and the special tokens are numbered from N.
    Any violation is a ValueError naming `source` and the 1-based line number.
    """
    ranks: Dict[bytes, int] = {}
    seen_ranks = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        where = f"{source}, line {lineno}"
        if len(parts) != 2:
            raise ValueError(f"{where}: expected 'base64_token rank', got {line[:80]!r}")
        b64, rank_str = parts
        try:
            token = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: {b64[:80]!r} is not valid base64") from None
        if not (rank_str.isascii() and rank_str.isdigit()):  # rejects signs too: ranks are >= 0
            raise ValueError(f"{where}: rank {rank_str[:80]!r} is not a non-negative integer")
        rank = int(rank_str)
        if not token:
            raise ValueError(f"{where}: the token is empty")
        if token in ranks:
            raise ValueError(f"{where}: token {token!r} appears twice (first with rank {ranks[token]})")
        if rank in seen_ranks:
            raise ValueError(f"{where}: rank {rank} appears twice")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise ValueError(f"{source}: no tokens in the file (expected lines of 'base64_token rank')")
    check_ranks(ranks, source)
    return ranks


def check_ranks(mergeable_ranks: Dict[bytes, int], source: str = "mergeable_ranks") -> None:
    """Raise ValueError unless the ranks are 0..N-1 and all 256 single bytes are tokens."""
    n = len(mergeable_ranks)
    if set(mergeable_ranks.values()) != set(range(n)):
        missing = sorted(set(range(n)) - set(mergeable_ranks.values()))[:5]
        raise ValueError(f"{source}: ranks must be exactly 0..{n - 1} (one per token); missing e.g. {missing}")
    missing_bytes = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
    if missing_bytes:
        raise ValueError(
            f"{source}: all 256 single bytes must be tokens (byte-level BPE starts from them); "
            f"missing {len(missing_bytes)}, e.g. byte {missing_bytes[0]}"
        )


def format_model_file(mergeable_ranks: Dict[bytes, int]) -> bytes:
    """The inverse of `parse_model_file`: lines `base64(token) rank\\n` in rank order."""
    lines = [
        base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
        for token, rank in sorted(mergeable_ranks.items(), key=lambda item: item[1])
    ]
    return b"".join(lines)


def split_long_runs(s: str, max_run: int = MAX_NO_WHITESPACES_CHARS) -> Iterator[str]:
    """Cut `s` so no piece holds more than `max_run` consecutive whitespace or non-whitespace chars.

    Same cut points as Meta's `_split_whitespaces_or_nonwhitespaces`: inside a maximal run of
    whitespace (str.isspace) or of non-whitespace, at every `max_run` characters from the run's
    start. Python's `\\s` is exactly str.isspace, so a regex finds the runs without a per-char loop.
    """
    start = 0
    for run in re.finditer(r"\s+|\S+", s):
        for cut in range(run.start() + max_run, run.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


_INSTANCE: Optional["Tokenizer"] = None


def _special_names(arg: str, value) -> Union[Literal["all"], set]:
    """`"all"` or a collection of special-token names, as a set; a lone name is a TypeError
    (iterating "<|eot_id|>" would silently give its characters)."""
    if value == "all":
        return "all"
    if isinstance(value, str) or not isinstance(value, Collection) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{arg} must be 'all' or a set of special-token names such as {{'<|eot_id|>'}}, got {value!r}")
    return set(value)


class Tokenizer:
    """Llama 3's tokenizer (Meta's interface): `encode(s, bos=..., eos=...)` -> ids, `decode(ids)` -> str.

    `Tokenizer()` loads Meta's 128,256-token vocabulary from the installed llama-models package;
    `Tokenizer(path)` loads any tiktoken `.model` file (e.g. one saved by `llama3np.bpe.train`);
    `Tokenizer.from_ranks(ranks)` builds one from a {token bytes: rank} dict.
    Ids 0..N-1 are the N BPE tokens of the file, N..N+255 the special tokens; `n_words` = N + 256.
    """

    pat_str = PAT_STR
    num_reserved_special_tokens = NUM_SPECIAL_TOKENS

    def __init__(self, path: Optional[Union[str, os.PathLike]] = None):
        path = default_model_path() if path is None else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")  # base64 and digits only, so ASCII in practice
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a text file (tiktoken .model files are base64 lines): {e}") from None
        self._setup(parse_model_file(text, str(path)), name=path.name)
        self.model_path: Optional[Path] = path

    @classmethod
    def get_instance(cls) -> "Tokenizer":
        """Meta's vocabulary, loaded once per process and shared (loading takes ~0.5 s)."""
        global _INSTANCE
        if _INSTANCE is None:
            _INSTANCE = cls()
        return _INSTANCE

    @classmethod
    def from_ranks(cls, mergeable_ranks: Dict[bytes, int], name: str = "bpe") -> "Tokenizer":
        """A tokenizer from {token bytes: rank}; ranks 0..N-1 including all 256 single bytes."""
        if not isinstance(mergeable_ranks, dict):
            raise TypeError(f"mergeable_ranks must be a dict {{bytes: int}}, got {type(mergeable_ranks).__name__}")
        for token, rank in mergeable_ranks.items():
            if not isinstance(token, bytes) or not token or not isinstance(rank, int) or isinstance(rank, bool):
                raise TypeError(f"mergeable_ranks must map non-empty bytes to int, got {token!r}: {rank!r}")
        check_ranks(mergeable_ranks, name)
        self = cls.__new__(cls)
        self._setup(dict(mergeable_ranks), name=name)
        self.model_path = None
        return self

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<bytes>") -> "Tokenizer":
        """A tokenizer from the contents of a `.model` file (e.g. embedded in a training checkpoint)."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"data must be the bytes of a .model file, got {type(data).__name__}")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}: not a tiktoken .model file (not text): {e}") from None
        return cls.from_ranks(parse_model_file(text, name), name=name)

    def _setup(self, mergeable_ranks: Dict[bytes, int], name: str) -> None:
        self.name = name
        self.mergeable_ranks = mergeable_ranks
        num_base_tokens = len(mergeable_ranks)
        self.special_tokens: Dict[str, int] = {
            token: num_base_tokens + i for i, token in enumerate(special_token_names())
        }
        self.model = tiktoken.Encoding(
            name=name, pat_str=self.pat_str, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self.n_words: int = num_base_tokens + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        # Instruct models end a reply with <|eot_id|> (or <|eom_id|> before a tool call); base models
        # with <|end_of_text|>. Generation stops at any of them.
        self.stop_tokens: List[int] = [self.eos_id, self.eom_id, self.eot_id]

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_words={self.n_words})"

    # ---- encoding -------------------------------------------------------------------------------

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Optional[Union[Literal["all"], AbstractSet[str]]] = None,
        disallowed_special: Union[Literal["all"], Collection[str]] = (),
    ) -> List[int]:
        """Text -> token ids, with `<|begin_of_text|>` first if `bos` and `<|end_of_text|>` last if `eos`.

        Text that looks like a special token (e.g. "<|eot_id|>" typed by a user) is encoded as
        ordinary text unless its name is in `allowed_special` (or allowed_special="all"), so user
        input cannot forge chat structure. Names in `disallowed_special` raise ValueError if present.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        allowed_special = _special_names("allowed_special", set() if allowed_special is None else allowed_special)
        disallowed_special = _special_names("disallowed_special", disallowed_special)
        ids: List[int] = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(s[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                ids.extend(
                    self.model.encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
                )
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    # ---- decoding -------------------------------------------------------------------------------

    def _check_ids(self, ids) -> List[int]:
        """Ids as a list of Python ints, or a TypeError/ValueError saying what is wrong."""
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise TypeError(f"decode expects a 1-D integer array of ids, got shape {ids.shape} dtype {ids.dtype}")
            ids = ids.tolist()
        elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"decode expects a sequence of int token ids, got {type(ids).__name__}")
        else:
            ids = list(ids)
            for t in ids:
                if not isinstance(t, (int, np.integer)) or isinstance(t, (bool, np.bool_)):
                    raise TypeError(f"decode expects int token ids, got {t!r} ({type(t).__name__})")
            ids = [int(t) for t in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.n_words):
            bad = next(t for t in ids if not 0 <= t < self.n_words)
            raise ValueError(f"token id {bad} is out of range: this tokenizer has ids 0..{self.n_words - 1}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text. Bytes that do not form valid UTF-8 (e.g. half of an emoji, when a
        sequence is cut mid-character) become U+FFFD, as in Meta's tokenizer."""
        return self.model.decode(self._check_ids(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Token ids -> the raw bytes they stand for (no UTF-8 decoding), e.g. for streaming output."""
        return self.model.decode_bytes(self._check_ids(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token gives its name, e.g. b'<|eot_id|>')."""
        return self.model.decode_single_token_bytes(self._check_ids([token_id])[0])

    # ---- saving ---------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The `.model` file contents (special tokens are not stored: they follow from the ranks)."""
        return format_model_file(self.mergeable_ranks)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the vocabulary in tiktoken's `.model` format, atomically; `Tokenizer(path)` reloads it."""
        atomic_write_bytes(path, self.to_bytes())


# ---- the chat format ----------------------------------------------------------------------------

Message = Dict[str, str]
Dialog = Sequence[Message]

# "ipython" is the role of tool results in Llama 3.1+; llama-models calls it "tool" in its API.
ROLES = ("system", "user", "assistant", "ipython")
_ROLE_ALIASES = {"tool": "ipython"}


class ChatFormat:
    """Llama 3's instruct template, as token ids:

        <|begin_of_text|>
        <|start_header_id|>system<|end_header_id|>\\n\\n{content}<|eot_id|>
        <|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n          <- the model continues from here

    One BOS for the whole dialog; each message's content is stripped of surrounding whitespace.
    Message contents are encoded as ordinary text, so a user typing "<|eot_id|>" cannot end a turn.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @staticmethod
    def _role(message: Message) -> str:
        """The header name of the message's role ("tool" is written "ipython"), or a clear error."""
        if not isinstance(message, dict):
            raise TypeError(f"a message must be a dict with 'role' and 'content', got {type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"message {message!r} has no 'role' key (expected 'role' and 'content')")
        role = message["role"]
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise ValueError(f"unknown role {message['role']!r}; expected one of {ROLES} (or 'tool')")
        return role

    def encode_header(self, message: Message) -> List[int]:
        """`<|start_header_id|>{role}<|end_header_id|>\\n\\n` as ids (only message["role"] is read)."""
        tok = self.tokenizer
        ids = [tok.special_tokens["<|start_header_id|>"]]
        ids.extend(tok.encode(self._role(message), bos=False, eos=False))
        ids.append(tok.special_tokens["<|end_header_id|>"])
        ids.extend(tok.encode("\n\n", bos=False, eos=False))
        return ids

    def encode_message(self, message: Message) -> List[int]:
        """Header, stripped content, `<|eot_id|>`."""
        self._role(message)
        if "content" not in message:
            raise ValueError(f"message {message!r} has no 'content' key (expected 'role' and 'content')")
        content = message["content"]
        if not isinstance(content, str):
            raise TypeError(f"message content must be a str, got {type(content).__name__}")
        ids = self.encode_header(message)
        ids.extend(self.tokenizer.encode(content.strip(), bos=False, eos=False))
        ids.append(self.tokenizer.eot_id)
        return ids

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """BOS, every message, then an empty assistant header: the prompt that asks for a reply."""
        if isinstance(dialog, (str, dict)) or not isinstance(dialog, Sequence):
            raise TypeError(f"a dialog must be a list of messages (dicts), got {type(dialog).__name__}")
        ids = [self.tokenizer.bos_id]
        for message in dialog:
            ids.extend(self.encode_message(message))
        ids.extend(self.encode_header({"role": "assistant"}))
        return ids

    def decode_reply(self, ids: Sequence[int]) -> Tuple[str, Optional[int]]:
        """A generated reply -> (text before the first stop token, that stop token or None if cut off)."""
        ids = self.tokenizer._check_ids(ids)
        for i, t in enumerate(ids):
            if t in self.tokenizer.stop_tokens:
                return self.tokenizer.decode(ids[:i]), t
        return self.tokenizer.decode(ids), None
