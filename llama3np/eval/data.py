"""MMLU questions from what is on disk: nothing is downloaded at run time.

    questions, dev = read_hendrycks("data/")        hendrycks/test's CSV folders: dev/*_dev.csv, test/*_test.csv
    questions, dev = read_parquet("cais/mmlu/all")  the Hugging Face `cais/mmlu` parquet files
    questions, defects = read_lm_eval_cot()         282 real MMLU dev questions inside lm-evaluation-harness
    questions, dev = load(path)                     any of the above ("lm-eval-cot" for the last)

Every reader returns subject -> list of {"question": str, "choices": [str, ...], "answer": int 0-3}, the
subjects sorted by name (as hendrycks' evaluate.py does). A malformed row is a ValueError naming the file
and the row. The CSVs are read as text with the csv module: unlike pandas (which hendrycks' script uses)
no cell becomes a number or NaN, so a choice "None" stays "None".
"""
import csv
import json
import re
from pathlib import Path

LETTER_TO_INDEX = {"A": 0, "B": 1, "C": 2, "D": 3}


def _subject_of(path, suffix):
    return path.name[: -len(suffix)]


def read_hendrycks_csv(path):
    """One `{subject}_{split}.csv` (no header: question, A, B, C, D, answer letter) -> list of questions."""
    path = Path(path)
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row_number, row in enumerate(csv.reader(f), start=1):
            if len(row) != 6:
                raise ValueError(f"{path}, row {row_number}: {len(row)} columns, expected 6 "
                                 "(question, A, B, C, D, answer)")
            answer = row[5].strip()
            if answer not in LETTER_TO_INDEX:
                raise ValueError(f"{path}, row {row_number}: answer {row[5]!r} is not one of A, B, C, D")
            out.append(dict(question=row[0], choices=row[1:5], answer=LETTER_TO_INDEX[answer]))
    return out


def read_hendrycks(folder, split="test"):
    """hendrycks/test's layout (folder/dev/*_dev.csv, folder/{split}/*_{split}.csv) -> (questions, dev)."""
    folder = Path(folder)
    if not (folder / split).is_dir() and (folder / "data" / split).is_dir():
        folder = folder / "data"  # the extracted tarball holds data/
    if not (folder / split).is_dir():
        raise FileNotFoundError(f"{folder}: no {split}/ folder (expected {split}/*_{split}.csv and dev/*_dev.csv)")
    questions, dev = {}, {}
    for path in sorted((folder / split).glob(f"*_{split}.csv")):
        questions[_subject_of(path, f"_{split}.csv")] = read_hendrycks_csv(path)
    if not questions:
        raise FileNotFoundError(f"{folder / split}: no *_{split}.csv files")
    for path in sorted((folder / "dev").glob("*_dev.csv")) if (folder / "dev").is_dir() else []:
        dev[_subject_of(path, "_dev.csv")] = read_hendrycks_csv(path)
    return questions, dev


# ----------------------------------------------------------------------------------------------------
def read_parquet_file(path):
    """One cais/mmlu parquet file (columns question, subject, choices, answer) -> subject -> questions."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from None
    path = Path(path)
    table = pq.read_table(path)
    missing = [c for c in ("question", "subject", "choices", "answer") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; cais/mmlu files have question, subject, choices, answer")
    out = {}
    for row_number, row in enumerate(table.to_pylist()):
        subject, choices, answer = row["subject"], row["choices"], row["answer"]
        if not subject:
            raise ValueError(f"{path}, row {row_number}: no subject")
        if not isinstance(row["question"], str):
            raise ValueError(f"{path}, row {row_number}: question is {row['question']!r}, expected text")
        if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{path}, row {row_number}: choices {choices!r}, expected 4 strings")
        if isinstance(answer, str) and answer in LETTER_TO_INDEX:
            answer = LETTER_TO_INDEX[answer]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
            raise ValueError(f"{path}, row {row_number}: answer {answer!r} is not 0-3 (A-D)")
        out.setdefault(subject, []).append(dict(question=row["question"], choices=list(choices), answer=answer))
    return out


def _merge(into, more):
    for subject, items in more.items():
        into.setdefault(subject, []).extend(items)
    return into


def read_parquet(path, split="test"):
    """A cais/mmlu parquet file (its split taken as `split`) or a folder of them (files named
    {split}-*.parquet and dev-*.parquet, at any depth) -> (questions, dev)."""
    path = Path(path)
    if path.is_file():
        return dict(sorted(read_parquet_file(path).items())), {}
    if not path.is_dir():
        raise FileNotFoundError(f"no parquet file or folder at {path}")
    questions, dev = {}, {}
    for f in sorted(path.rglob(f"{split}-*.parquet")):
        _merge(questions, read_parquet_file(f))
    for f in sorted(path.rglob("dev-*.parquet")):
        _merge(dev, read_parquet_file(f))
    if not questions:
        raise FileNotFoundError(f"{path}: no {split}-*.parquet files (the cais/mmlu layout)")
    return dict(sorted(questions.items())), dict(sorted(dev.items()))


# ----------------------------------------------------------------------------------------------------
COT_RESOURCE = "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
COT_HEADER = "The following are multiple choice questions (with answers) about "
COT_REASONING = "\nA: Let's think step by step."
# The one abstract_algebra question whose text begins with the previous answer's reasoning.
COT_LEAK = ("The symmetric group $S_n$ has $\nactorial{n}$ elements, hence it is not true that $S_{10}$ has 10 "
            "elements.\n")


def _parse_cot_block(subject, block):
    """One "Q: ...\\n(A) .. (B) .. (C) .. (D) ..\\nA: ... The answer is (X)." -> question dict, n options."""
    q, sep, reasoning = block.partition(COT_REASONING)
    if not sep:
        raise ValueError(f"{subject}: a question without its 'A: Let's think step by step.' answer: {block[:80]!r}")
    head, sep, options = q.rpartition("\n(A) ")
    if not sep:
        raise ValueError(f"{subject}: no '(A)' option line in {q[:80]!r}")
    parts = re.split(r"[ \n]\(([B-Z])\) ", options)  # options on one line, or one per line
    choices, letters = [parts[0]] + parts[2::2], parts[1::2]
    if letters != [chr(ord("B") + i) for i in range(len(letters))]:
        raise ValueError(f"{subject}: options out of order ({letters}) in {q[:80]!r}")
    found = re.findall(r"The answer is \(([A-Z])\)", reasoning)
    if not found:
        raise ValueError(f"{subject}: no 'The answer is (X)' in the reasoning of {head[:80]!r}")
    answer = ord(found[-1]) - ord("A")
    return dict(question=head, choices=choices, answer=answer, reasoning=reasoning.strip()), len(choices)


def parse_cot_prompts(prompts):
    """{subject: CoT prompt text} (lm-evaluation-harness's _cot_prompts.json) -> (questions, defects).

    Cleaning, each recorded in `defects` (a list of {"subject", "defect", "fix"}):
    - form-feed / carriage-return characters (JSON "\\f" / "\\r" that were LaTeX \\frac, \\right): put back
      as the backslash sequences they were;
    - a header with a stray leading newline: stripped;
    - abstract_algebra's question that begins with the previous answer's leaked reasoning: the leaked
      line removed;
    - items with other than four options (college_chemistry has one with five): dropped.
    """
    questions, defects = {}, []
    for subject, text in prompts.items():
        n_ctrl = text.count("\f") + text.count("\r")
        if n_ctrl:
            text = text.replace("\f", "\\f").replace("\r", "\\r")
            defects.append(dict(subject=subject, defect=f"{n_ctrl} form-feed/carriage-return characters "
                                "(broken LaTeX escapes)", fix="restored as \\f / \\r"))
        if text.startswith("\n"):
            text = text.lstrip("\n")
            defects.append(dict(subject=subject, defect="header starts with a newline", fix="stripped"))
        if not text.startswith(COT_HEADER):
            raise ValueError(f"{subject}: the prompt does not start with {COT_HEADER!r}")
        _, _, body = text.partition("\n\n")
        items = []
        for block in body.split("\n\nQ: "):
            block = block[3:] if block.startswith("Q: ") else block
            if not block.strip():
                continue
            if block.startswith(COT_LEAK):
                block = block[len(COT_LEAK):]
                defects.append(dict(subject=subject, defect="the previous answer's reasoning leaked into the "
                                    "question text", fix="leaked line removed"))
            item, n_options = _parse_cot_block(subject, block)
            if n_options != 4:
                defects.append(dict(subject=subject, defect=f"an item with {n_options} options: "
                                    f"{item['question'][:60]!r}", fix="dropped"))
                continue
            items.append(item)
        questions[subject] = items
    return dict(sorted(questions.items())), defects


def read_lm_eval_cot():
    """The 282 real MMLU dev questions of lm-evaluation-harness's CoT prompts, cleaned: 281 four-option
    items over 57 subjects -> (questions, defects). These are MMLU's DEV split, not its test set: score
    them with leave-one-out shots. Needs `pip install --no-deps lm-eval` (read with importlib.resources)."""
    import importlib.resources

    try:
        resource = importlib.resources.files("lm_eval") / COT_RESOURCE
    except ModuleNotFoundError:
        raise FileNotFoundError("lm-evaluation-harness is not installed: pip install --no-deps lm-eval "
                                f"(its wheel carries lm_eval/{COT_RESOURCE})") from None
    if not resource.is_file():
        raise FileNotFoundError(f"lm_eval/{COT_RESOURCE} is not in the installed lm-eval package")
    return parse_cot_prompts(json.loads(resource.read_text(encoding="utf-8")))


def load(path, split="test"):
    """questions, dev from a hendrycks CSV folder, a cais/mmlu parquet file/folder, or "lm-eval-cot"
    (then dev is the questions themselves: use leave-one-out shots)."""
    if str(path) == "lm-eval-cot":
        questions, _ = read_lm_eval_cot()
        return questions, questions
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data: {path} not found (a hendrycks data/ folder, a cais/mmlu parquet "
                                "file or folder, or 'lm-eval-cot')")
    if p.is_file() and p.suffix == ".parquet" or p.is_dir() and any(p.rglob("*.parquet")):
        return read_parquet(p, split)
    if p.is_dir():
        return read_hendrycks(p, split)
    raise ValueError(f"{path}: not a folder or a .parquet file")
