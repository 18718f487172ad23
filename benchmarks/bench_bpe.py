"""Benchmark: train a 4096-id BPE on ~5 MB of text with llama3np.bpe, beside Hugging Face `tokenizers`.

Target: well under a minute on one core for ours. The reference is the Rust BPE trainer of Hugging
Face's `tokenizers` set up like Llama 3's tokenizer.json (the same pre-tokenizer regex, then
byte-level), pinned to one thread (RAYON_NUM_THREADS=1) so both use one core. Both learn
4096 - 256 specials - 256 bytes = 3584 merges. Also compares encode speed with Meta's tokenizer.

    python benchmarks/bench_bpe.py [--input FILE] [--mb 5] [--vocab-size 4096]

Without --input the text is the Python standard library's source (present on every machine).
NumPy/BLAS play no part here, so OPENBLAS_* variables are irrelevant and left alone.
"""
import argparse
import os
import sys
import sysconfig
import time
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # before importing tokenizers: its trainer is multi-threaded
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama3np.bpe import MIN_VOCAB_SIZE, train  # noqa: E402
from llama3np.tokenizer import NUM_SPECIAL_TOKENS, PAT_STR, Tokenizer  # noqa: E402


def stdlib_text(n_bytes: int) -> str:
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text.encode())
        if size >= n_bytes:
            break
    return "".join(parts).encode()[:n_bytes].decode("utf-8", "ignore")


def best_of_3(fn):
    """(fastest of three runs in seconds, the result): the machine is shared, so take the minimum."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def hf_train(text: str, vocab_size: int):
    """HF tokenizers' BPE with Llama 3's split regex + byte-level alphabet; returns (seconds, n_merges)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n_base = vocab_size - NUM_SPECIAL_TOKENS  # HF counts the 256-byte alphabet in its vocab_size
    trainer = trainers.BpeTrainer(vocab_size=n_base, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # HF is fastest fed blocks of lines (one 5 MB string is ~3x slower); blocks end at newlines
    lines = text.splitlines(keepends=True)
    blocks = ["".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000)]
    t0 = time.perf_counter()
    tok.train_from_iterator(blocks, trainer=trainer)
    seconds = time.perf_counter() - t0
    return seconds, tok.get_vocab_size() - 256


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="UTF-8 text file (default: Python stdlib sources)")
    parser.add_argument("--mb", type=float, default=5.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    n_bytes = int(args.mb * 1e6)
    if args.input:
        text = Path(args.input).read_bytes()[:n_bytes].decode("utf-8", "ignore")
        source = args.input
    else:
        text = stdlib_text(n_bytes)
        source = "Python stdlib sources"
    print(f"text: {len(text.encode()) / 1e6:.2f} MB from {source}; vocab_size {args.vocab_size} "
          f"({args.vocab_size - MIN_VOCAB_SIZE} merges); one core for both trainers (RAYON_NUM_THREADS=1)")

    t0 = time.perf_counter()
    ours = train(text, args.vocab_size)
    t_ours = time.perf_counter() - t0
    ids = ours.encode(text, bos=False, eos=False)
    print(f"llama3np.bpe.train:      {t_ours:6.2f} s, {len(text.encode()) / len(ids):.3f} bytes/token")

    try:
        t_hf, hf_merges = hf_train(text, args.vocab_size)
        print(f"HF tokenizers (Rust):    {t_hf:6.2f} s, {hf_merges} merges; ours / HF = {t_ours / t_hf:.1f}x")
    except ImportError:
        print("HF tokenizers not installed: no reference timing")

    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    sample = text[:2_000_000]
    llama3 = Tokenizer()
    t_enc, ours_ids = best_of_3(lambda: llama3.encode(sample, bos=False, eos=False))
    ref = MetaTokenizer.get_instance()
    t_ref, ref_ids = best_of_3(lambda: ref.encode(sample, bos=False, eos=False))
    assert ours_ids == ref_ids, "our Llama 3 tokenizer disagrees with Meta's on the benchmark text"
    mb = len(sample.encode()) / 1e6
    print(f"encode with Llama 3's vocabulary: ours {mb / t_enc:.1f} MB/s, Meta's {mb / t_ref:.1f} MB/s "
          f"(ours / Meta time = {t_enc / t_ref:.2f}x; identical ids)")


if __name__ == "__main__":
    main()
