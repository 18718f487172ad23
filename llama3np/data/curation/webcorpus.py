"""A generated web-like corpus: prose mixed with junk of known kinds, every document labelled.

The prose comes from a small grammar of common English words (no third-party text), or from real
text handed in (see sources.py); the junk imitates what a crawl holds. `make_web_corpus` returns
documents and labels: the label says what a document is, so the filters can be scored per kind.

    kind              what it looks like                               which stage should remove it
    prose             sentences in paragraphs                          none (kept)
    boilerplate       menus, "Home | About", short lines               FineWeb / C4 (line_punct, short lines)
    spam              a few phrases repeated                           Gopher repetition (n-grams)
    log               timestamps, levels, key=value                    Gopher / FineWeb
    code              braces and semicolons                            C4 curly_bracket
    lorem             lorem ipsum filler                               C4 lorem_ipsum
    repeated_lines    prose whose lines repeat                         Gopher repetition (dup lines)
    near_duplicate    a prose document with a few words edited         MinHash
    exact_duplicate   a prose document again                           exact dedup
    token_noise       prose salted with random strings of symbols      token KL
    nsfw              prose with stand-in dirty words                  NSFW
"""
import numpy as np

DETERMINERS = ["the", "a", "this", "that", "every", "one", "the", "the"]
ADJECTIVES = ["small", "old", "bright", "quiet", "early", "careful", "simple", "large", "green", "distant",
              "modern", "gentle", "useful", "common", "strange", "northern", "heavy", "clear", "local", "final"]
NOUNS = ["river", "village", "teacher", "machine", "garden", "letter", "market", "window", "island", "engine",
         "farmer", "student", "mountain", "library", "question", "report", "harbour", "bridge", "painter",
         "doctor", "forest", "station", "kitchen", "company", "winter", "history", "journey", "language"]
VERBS = ["describes", "follows", "reaches", "carries", "finds", "builds", "watches", "opens", "explains",
         "remembers", "changes", "measures", "crosses", "visits", "protects", "studies", "repairs", "shows"]
ADVERBS = ["slowly", "often", "again", "later", "carefully", "rarely", "together", "quickly", "still"]
CONNECTIVES = ["and then", "because", "while", "so that", "although", "before", "after"]
LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore "
         "et dolore magna aliqua").split()
# made-up words standing in for a real list; none occurs in the real sources ("plonk" did: the Jargon
# File defines it, and a Jargon page was removed as NSFW)
STAND_IN_DIRTY = ["zorbly", "fleeb", "grimsh", "glorpt", "squanch"]
KINDS = ("prose", "boilerplate", "spam", "log", "code", "lorem", "repeated_lines", "near_duplicate",
         "exact_duplicate", "token_noise", "nsfw")


def _pick(rng, words):
    return words[int(rng.integers(len(words)))]


def sentence(rng):
    """One grammatical sentence of 8-20 words ending in a period (sometimes ! or ?)."""
    def np_(): return f"{_pick(rng, DETERMINERS)} {_pick(rng, ADJECTIVES)} {_pick(rng, NOUNS)}"
    s = f"{np_()} {_pick(rng, VERBS)} {np_()}"
    if rng.random() < 0.5:
        s += f" with {np_()}"
    if rng.random() < 0.5:
        s += f" {_pick(rng, CONNECTIVES)} {np_()} {_pick(rng, VERBS)} {_pick(rng, ADVERBS)}"
    end = "." if rng.random() < 0.9 else _pick(rng, ["!", "?"])
    return s[0].upper() + s[1:] + end


def prose(rng, n_paragraphs=None):
    """Paragraphs of 3-6 sentences, one paragraph per line, blank lines between."""
    n_paragraphs = n_paragraphs or int(rng.integers(3, 7))
    return "\n\n".join(" ".join(sentence(rng) for _ in range(int(rng.integers(3, 7)))) for _ in range(n_paragraphs))


def boilerplate(rng):
    items = ["Home", "About us", "Contact", "Login", "Sign up", "Blog", "Shop", "Careers", "FAQ", "Help"]
    lines = [" | ".join(rng.permutation(items)[:5]) for _ in range(3)]
    lines += [f"{_pick(rng, items)} >> {_pick(rng, NOUNS).title()}" for _ in range(int(rng.integers(8, 15)))]
    lines += ["Copyright 2024. All rights reserved", "Follow us on social media"]
    return "\n".join(lines)


def spam(rng):
    phrases = [f"best {_pick(rng, NOUNS)} deals", "buy now", "cheap price", "free shipping today",
               f"click here for {_pick(rng, NOUNS)}"]
    return " ".join(_pick(rng, phrases) for _ in range(int(rng.integers(60, 120)))) + "."


def log(rng):
    levels = ["INFO", "WARN", "DEBUG", "ERROR"]
    return "\n".join(f"2024-03-{int(rng.integers(1, 29)):02d} {int(rng.integers(24)):02d}:{int(rng.integers(60)):02d}:"
                     f"{int(rng.integers(60)):02d} {_pick(rng, levels)} pid={int(rng.integers(1000, 9999))} "
                     f"req={int(rng.integers(10**6))} t={rng.random():.3f}ms"
                     for _ in range(int(rng.integers(20, 40))))


def code(rng):
    body = []
    for i in range(int(rng.integers(5, 12))):
        name = _pick(rng, NOUNS)
        body.append(f"function {name}{i}(x) {{\n  var y = x * {i};\n  return y + {name}.length;\n}}")
    return prose(rng, 1) + "\n\n" + "\n".join(body)


def lorem(rng):
    paragraphs = [" ".join(_pick(rng, LOREM) for _ in range(int(rng.integers(40, 80)))) for _ in range(3)]
    return "Lorem ipsum dolor sit amet. " + "\n\n".join(p.capitalize() + "." for p in paragraphs)


def repeated_lines(rng):
    lines = [sentence(rng) for _ in range(4)]
    return "\n".join(_pick(rng, lines) for _ in range(int(rng.integers(15, 25))))


def near_duplicate(rng, text, edit_fraction=0.02):
    """`text` with about edit_fraction of its words replaced by other words (kept Jaccard high)."""
    words = text.split(" ")
    for i in rng.choice(len(words), size=max(1, int(len(words) * edit_fraction)), replace=False):
        words[i] = _pick(rng, NOUNS)
    return " ".join(words)


def token_noise(rng, text):
    """`text` with a third of its words replaced by random strings from ~1,900 rare letters (Latin
    Extended, Greek, Cyrillic, Armenian): mojibake-like outlier tokens the corpus hardly has."""
    alphabet = [chr(c) for r in ((0x100, 0x250), (0x370, 0x3FF), (0x400, 0x530), (0x531, 0x557)) for c in range(*r)
                if chr(c).isalpha()]  # letters only: spaCy splits symbols off words
    words = text.split(" ")
    for i in rng.choice(len(words), size=len(words) // 3, replace=False):
        words[i] = "".join(rng.choice(alphabet, size=int(rng.integers(4, 10))))
    return " ".join(words)


def nsfw(rng, text, dirty_words=STAND_IN_DIRTY, n=6):
    words = text.split(" ")
    for i in rng.choice(len(words), size=min(n, len(words)), replace=False):
        words[i] = _pick(rng, list(dirty_words))
    return " ".join(words)


def make_web_corpus(n_docs, seed=0, prose_fn=None, dirty_words=STAND_IN_DIRTY, junk_fraction=0.4):
    """-> (texts, labels): n_docs documents, about junk_fraction of them junk of the kinds above, in a
    shuffled order fixed by seed. prose_fn(rng) -> str supplies the clean text (default: the grammar)."""
    rng = np.random.default_rng(seed)
    prose_fn = prose_fn or prose
    junk = KINDS[1:]
    texts, labels, clean = [], [], []
    for _ in range(n_docs):
        if rng.random() >= junk_fraction or not clean:
            t = prose_fn(rng)
            texts.append(t), labels.append("prose"), clean.append(t)
            continue
        kind = _pick(rng, junk)
        base = _pick(rng, clean)
        t = {"boilerplate": lambda: boilerplate(rng), "spam": lambda: spam(rng), "log": lambda: log(rng),
             "code": lambda: code(rng), "lorem": lambda: lorem(rng), "repeated_lines": lambda: repeated_lines(rng),
             "near_duplicate": lambda: near_duplicate(rng, base), "exact_duplicate": lambda: base,
             "token_noise": lambda: token_noise(rng, base), "nsfw": lambda: nsfw(rng, base, dirty_words)}[kind]()
        texts.append(t), labels.append(kind)
    return texts, labels


def varied_corpus(n_docs, seed=0, kinds=KINDS):
    """Documents that sit on both sides of every heuristic threshold: the web-like kinds plus prose
    with hashes, ellipses, bullets, short lines, citations, javascript and cookie lines, numbers and
    very long words mixed in at random rates. For comparing filters with a reference implementation.
    `kinds` limits the web-like half to those kinds (logs and code tokenise differently in spaCy)."""
    rng = np.random.default_rng(seed)
    texts, labels = make_web_corpus(n_docs, seed=seed)
    texts = [t for t, k in zip(texts, labels) if k in kinds][:n_docs // 2]
    extras = [lambda: "#" + _pick(rng, NOUNS), lambda: "...", lambda: "…", lambda: "[1]", lambda: "[edit]",
              lambda: str(int(rng.integers(1000))), lambda: f"{rng.random() * 100:.2f}", lambda: "-",
              lambda: "x" * int(rng.integers(990, 1010)) if rng.random() < 0.1 else "word",
              lambda: "javascript", lambda: "uses cookies",
              lambda: "&", lambda: "(" + _pick(rng, NOUNS) + ")", lambda: "don't", lambda: "it's", lambda: ";"]
    while len(texts) < n_docs:
        lines = []
        for _ in range(int(rng.integers(1, 25))):
            kind = rng.random()
            if kind < 0.55:
                line = " ".join(sentence(rng) for _ in range(int(rng.integers(1, 4))))
            elif kind < 0.7:
                line = " ".join(_pick(rng, NOUNS) for _ in range(int(rng.integers(1, 5))))
            elif kind < 0.8:
                line = _pick(rng, ["- ", "• ", "* "]) + sentence(rng)
            elif kind < 0.9:
                line = sentence(rng)[:-1] + _pick(rng, ["...", "…", "", ":", '."', "!'"])
            else:
                line = lines[-1] if lines else sentence(rng)  # a repeated line
            words = line.split(" ")
            for _ in range(int(rng.poisson(rng.choice([0.2, 1.0, 4.0])))):
                words.insert(int(rng.integers(len(words) + 1)), extras[int(rng.integers(len(extras)))]())
            lines.append(" ".join(words))
        sep = _pick(rng, ["\n", "\n\n", "\n", "\n\n\n"])
        texts.append(sep.join(lines))
    return texts
