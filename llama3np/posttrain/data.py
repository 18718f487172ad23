"""Post-training data in the formats TRL users already have, turned into token rows with loss masks.

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}     SFT
    {"prompt": ..., "chosen": ..., "rejected": ...}                                              preferences
(prompt a string or a list of messages; chosen/rejected a string or a one-message assistant list)

Everything goes through Llama 3's `ChatFormat`:
    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{reply}<|eot_id|>
SFT's loss is on the assistant tokens only (reply and its <|eot_id|>: the model must learn to stop).
DPO's log-probs are on the reply only (Llama 3 masks the formatting tokens, <|eot_id|> included, out of
both sums); `mask_eot=False` keeps it in, for the ablation.
Rule for length: a row longer than max_seq_len is an error naming the row (no silent truncation).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tokenizer import ChatFormat


def read_jsonl(path):
    """-> list of dicts, one per non-empty line; a line that is not a JSON object is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not JSON ({e.msg}): {line.strip()[:60]!r}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def write_jsonl(path, rows):
    from ..fileio import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _check_len(n, max_seq_len, where):
    if max_seq_len is not None and n > max_seq_len:
        raise ValueError(f"{where}: {n} tokens, longer than max_seq_len={max_seq_len} (rows are not truncated: "
                         "shorten the dialog or raise max_seq_len)")


def sft_example(fmt: ChatFormat, messages, max_seq_len=None, where="dialog"):
    """A dialog -> (ids, mask): mask 1 on every assistant reply token and its <|eot_id|>."""
    if isinstance(messages, (str, dict)) or not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts")
    ids, mask = [fmt.tokenizer.bos_id], [0]
    n_assistant = 0
    for m in messages:
        role = fmt._role(m)  # unknown roles raise here, naming the role
        content = m.get("content")
        if role == "assistant":
            if not isinstance(content, str) or not content.strip():
                raise ValueError(f"{where}: an assistant turn is empty (nothing to learn from)")
            n_assistant += 1
        header = fmt.encode_header(m)
        body = fmt.encode_message(m)[len(header):]  # content + <|eot_id|>
        ids += header + body
        mask += [0] * len(header) + [int(role == "assistant")] * len(body)
    if n_assistant == 0:
        raise ValueError(f"{where}: no assistant turn (SFT learns the assistant's replies)")
    _check_len(len(ids), max_seq_len, where)
    return ids, mask


def _prompt_ids(fmt, prompt, where):
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    return fmt.encode_dialog_prompt(prompt)


def _reply_text(reply, where, key):
    if isinstance(reply, list):  # TRL's conversational form: [{"role": "assistant", "content": ...}]
        if len(reply) != 1 or not isinstance(reply[0], dict) or reply[0].get("role") != "assistant":
            raise ValueError(f"{where}: '{key}' as a list must hold one assistant message")
        reply = reply[0].get("content")
    if not isinstance(reply, str) or not reply.strip():
        raise ValueError(f"{where}: '{key}' is empty or not a string")
    return reply.strip()


@dataclass
class Pair:
    prompt: list  # token ids, ending with the assistant header
    chosen: list  # reply ids + <|eot_id|>
    rejected: list


def preference_example(fmt, row, max_seq_len=None, where="row"):
    """{"prompt", "chosen", "rejected"} -> Pair of token id lists."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise ValueError(f"{where}: missing '{key}' (expected prompt, chosen and rejected)")
    chosen, rejected = _reply_text(row["chosen"], where, "chosen"), _reply_text(row["rejected"], where, "rejected")
    if chosen == rejected:
        raise ValueError(f"{where}: chosen and rejected are the same text: the pair prefers nothing")
    tok = fmt.tokenizer
    prompt = _prompt_ids(fmt, row["prompt"], where)
    pair = Pair(prompt, tok.encode(chosen, bos=False, eos=False) + [tok.eot_id],
                tok.encode(rejected, bos=False, eos=False) + [tok.eot_id])
    _check_len(len(prompt) + max(len(pair.chosen), len(pair.rejected)), max_seq_len, where)
    return pair


def reply_rows(prompts, replies, mask_eot=True, pad_id=0):
    """Prompt ids and reply ids (each ending with <|eot_id|>) -> tokens (B, T), mask (B, T) on the replies.

    mask_eot=True leaves the final <|eot_id|> out of the mask (Llama 3's DPO masking)."""
    seqs, masks = [], []
    for p, r in zip(prompts, replies):
        seqs.append(list(p) + list(r))
        m = [0] * len(p) + [1] * len(r)
        if mask_eot:
            m[-1] = 0
        masks.append(m)
    T = max(len(s) for s in seqs)
    tokens = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=bool)
    for b, (s, m) in enumerate(zip(seqs, masks)):
        tokens[b, :len(s)], mask[b, :len(s)] = s, m
    return tokens, mask
