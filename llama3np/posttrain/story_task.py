"""A task whose truth is known: instructions that demand features of a story, and an exact checker.

    task = make_instruction(rng)               # Instruction(text="Write a story. The hero is a girl named ...",
                                               #             demands=(("name", ("girl", "Lily")), ...))
    story = write_story(task.demands, seed)    # a story from the grammar with every demand met
    met = check(task.demands, story)           # (True, True, False): which demands the text meets
    score(task.demands, story)                 # the fraction met: the ground truth of every stage

The stories come from `llama3np.data.stories` (its grammar, unchanged). Two things are derived here:
  - forcing: `write_story` runs the grammar with a chooser that answers the demanded decisions itself
    (and still draws a random number for them, so the other decisions are those of the unforced story:
    forcing more demands on the same seed is a minimal edit, the "edited" response of Llama 3's data);
  - parsing: the grammar can parse its own stories (`stories.derivations` replays it against a text).
    `parse` does the same but keeps the longest prefix that parses, so a reply with a slip in its last
    sentence still gets credit for the features it wrote before the slip. A feature counts only if a
    sentence written after its decision matched the text (the sentence that names it).
Which decision is which feature: the grammar passes its word lists to `pick` by identity (GIRLS, HOMES,
ANIMALS, ...), so a decision is recognised by the list it chooses from.
"""
import random
from dataclasses import dataclass

from ..data import stories as S

# ----------------------------------------------------------------------------------------------------
# the features, recognised by the options of a decision


_BY_LIST = {id(S.HERO_ADJECTIVES): "adjective", id(S.HOMES): "home", id(S.FAMILY): "family",
            id(S.HOBBIES): "hobby", id(S.PLACES): "place", id(S.COLORS): "color", id(S.THINGS): "thing",
            id(S.PETS): "pet", id(S.ANIMALS): "animal", id(S.TROUBLES): "trouble", id(S.OUTINGS): "outing",
            id(S.INDOOR): "indoor", id(S.FEELINGS): "feeling", id(S.LESSONS): "lesson",
            id(S.GIRLS): "name", id(S.BOYS): "name"}
_NOT_WRITTEN = (["feeling", "lesson"], ["share", "return"])  # decisions whose option is not in the text


def feature_of(options):
    """The feature name a `pick(options)` decides, or None for decisions no demand refers to."""
    name = _BY_LIST.get(id(options))
    if name is not None:
        return name
    if options == ["girl", "boy"]:
        return "gender"
    if options == ["feeling", "lesson"]:
        return "ending"
    if S.plot_animal in options:
        return "plot"
    return None


def written_as(options, option):
    """The words an option puts in the story (str, or the first item of a tuple such as a trouble's mood),
    or None when the option is not written as such (a plot, feeling-or-lesson, share-or-return)."""
    if callable(option) or options in _NOT_WRITTEN:
        return None
    return option[0] if isinstance(option, tuple) else option


PLOT_OF = {"animal": "plot_animal", "pet": "plot_lost_pet", "thing": "plot_found", "outing": "plot_rain"}
DEMAND_KINDS = ("name", "home", "hobby", "animal", "pet", "thing", "outing", "ending")


def demand_sentence(kind, value):
    """The words of the instruction for one demand."""
    if kind == "name":
        return f"The hero is a {value[0]} named {value[1]}."
    if kind == "home":
        return f"The hero lives {value}."
    if kind == "hobby":
        return f"The hero loves to {value}."
    if kind == "animal":
        return f"The hero meets {S.article(value)} {value}."
    if kind == "pet":
        return f"The hero loses a {value}."
    if kind == "thing":
        return f"The hero finds a {value}."
    if kind == "outing":
        return f"Rain stops a plan to {value}."
    if kind == "ending":
        return f"The story ends with a {value}."
    raise ValueError(f"unknown demand kind {kind!r}; expected one of {DEMAND_KINDS}")


def forced_choice(demands, feature, options):
    """The option a demand forces for this decision, or None if no demand decides it."""
    d = dict(demands)
    if feature == "gender" and "name" in d:
        return d["name"][0]
    if feature == "name" and "name" in d:
        return d["name"][1] if d["name"][1] in options else None
    if feature in ("home", "hobby", "ending") and feature in d:
        return d[feature]
    if feature == "plot":
        for kind, plot in PLOT_OF.items():
            if kind in d:
                return next(f for f in options if f.__name__ == plot)
    if feature in ("animal", "pet", "thing", "outing") and feature in d:
        return d[feature]
    return None


def met_by(kind, value, features):
    """Does a story with these (confirmed) features meet the demand (kind, value)?"""
    f = features
    if kind == "name":
        return f.get("gender") == value[0] and f.get("name") == value[1]
    if kind in ("home", "hobby", "ending"):
        return f.get(kind) == value
    return f.get("plot") == PLOT_OF[kind] and f.get(kind) == value


# ----------------------------------------------------------------------------------------------------
# instructions


@dataclass(frozen=True)
class Instruction:
    text: str
    demands: tuple  # ((kind, value), ...)


def check_kinds(kinds):
    """kinds: None (all of DEMAND_KINDS) or a non-empty subset of DEMAND_KINDS; anything else is a ValueError."""
    if kinds is not None and (not kinds or set(kinds) - set(DEMAND_KINDS)):
        raise ValueError(f"demand kinds must be a non-empty subset of {DEMAND_KINDS}, got {kinds}")
    return kinds


def values_of(kind, gender=None):
    """The values a demand of this kind can ask for (a name: of this gender's names)."""
    if kind == "name":
        if gender not in ("girl", "boy"):
            raise ValueError(f"a name's values need gender 'girl' or 'boy', got {gender!r}")
        return S.GIRLS if gender == "girl" else S.BOYS
    values = {"home": S.HOMES, "hobby": S.HOBBIES, "ending": ["feeling", "lesson"], "animal": S.ANIMALS,
              "pet": S.PETS, "thing": S.THINGS, "outing": S.OUTINGS}
    if kind not in values:
        raise ValueError(f"unknown demand kind {kind!r}; expected one of {DEMAND_KINDS}")
    return values[kind]


def wrong_value(kind, value, rng):
    """Another value of the same kind (a name: another name of the same gender): the demand's decision made,
    with the wrong option, as the SFT model gets it wrong ("named Max" where Leo was asked for)."""
    if kind == "name":
        return value[0], rng.choice([n for n in values_of("name", value[0]) if n != value[1]])
    return rng.choice([v for v in values_of(kind) if v != value])


def one_value_wrong(demands, rng):
    """-> the demands with one of them (a random one) asking for another value of its kind (`wrong_value`)."""
    d = list(demands)
    i = rng.randrange(len(d))
    d[i] = (d[i][0], wrong_value(d[i][0], d[i][1], rng))
    return tuple(d)


def make_instruction(rng, n_demands=None, kinds=None):
    """A random instruction with n_demands (default: 2 or 3) demands, at most one about the plot (a story has one).

    kinds: draw only demands of these kinds (e.g. ("home", "hobby", "ending")); None: all of DEMAND_KINDS."""
    check_kinds(kinds)
    if n_demands is not None and not 1 <= n_demands <= 5:
        raise ValueError(f"n_demands must be 1 to 5 (name, home, hobby, ending and one plot), got {n_demands}")
    n = n_demands or rng.choice([2, 3])
    plots = [k for k in PLOT_OF if kinds is None or k in kinds]  # a story has one plot: one of these at most
    pool = ["name", "home", "hobby", "ending"] + ([rng.choice(plots)] if plots else [])
    if kinds is not None:
        pool = [k for k in pool if k in kinds]
        n = min(n, len(pool))
    kinds = rng.sample(pool, n)
    demands = []
    for kind in sorted(kinds, key=DEMAND_KINDS.index):
        if kind == "name":
            gender = rng.choice(["girl", "boy"])
            value = (gender, rng.choice(values_of("name", gender)))
        else:
            value = rng.choice(values_of(kind))
        demands.append((kind, value))
    text = "Write a story. " + " ".join(demand_sentence(k, v) for k, v in demands)
    return Instruction(text, tuple(demands))


def instructions(n, seed, kinds=None, sizes=None):
    """n instructions from `seed`; sizes: the numbers of demands to draw from (None: 2 or 3, as held out)."""
    rng = random.Random(seed)
    return [make_instruction(rng, n_demands=rng.choice(sizes) if sizes else None, kinds=kinds) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# writing stories with demands forced


class ForcedSampler(S.Sampler):
    """stories.Sampler whose demanded decisions are forced. Every decision still draws from the generator,
    so the unforced decisions are those of the same seed without demands."""

    def __init__(self, seed, demands):
        super().__init__(seed)
        self.demands = demands

    def pick(self, options, weights=None):
        free = super().pick(options, weights)  # draws, keeps the stream of random numbers aligned
        forced = forced_choice(self.demands, feature_of(options), options)
        return free if forced is None else forced


def write_story(demands, seed):
    """The story of `seed` with `demands` forced (demands=() is plain `stories.sample_story(seed)[0]`)."""
    s = ForcedSampler(seed, demands)
    S.story(s)
    return "".join(s.parts)


# ----------------------------------------------------------------------------------------------------
# parsing and checking


class _Choices(Exception):
    """The replay needs one more decision; `viable` are the option indices still worth trying."""

    def __init__(self, viable):
        self.viable = viable


class _Recorder(S._Replayer):
    """Replays forced decisions and records each feature's value; a feature is confirmed once a sentence that
    writes it matched the text (the plot and the ending: the next sentence, which differs for each option).

    Options whose words occur nowhere in the rest of the text are not tried: that sentence could not match.
    """

    def __init__(self, target, forced):
        super().__init__(target, forced)
        self.pending, self.confirmed = {}, {}

    def pick(self, options, weights=None):
        if self.i == len(self.forced):
            rest = self.target[self.pos:]
            raise _Choices([k for k, o in enumerate(options)
                            if (w := written_as(options, o)) is None or w in rest])
        value = super().pick(options, weights)
        name = feature_of(options)
        if name is not None:
            self.pending[name] = (value.__name__ if name == "plot" else value, written_as(options, value))
        return value

    def say(self, text):
        super().say(text)  # raises _Mismatch when the text stops matching
        for name, (value, words) in list(self.pending.items()):
            if words is None or words in text:
                self.confirmed[name] = value
                del self.pending[name]


def parse(text, max_paths=200_000):
    """-> (features, complete): the features of the longest prefix of `text` the grammar writes, and
    whether the whole text is exactly one story of the grammar. Depth-first over decisions, as
    `stories.derivations`. When several decision paths match the same longest prefix, only the features
    on which they all agree count.
    """
    best_pos, best = -1, {}
    stack, n = [[]], 0
    while stack and n < max_paths:
        forced = stack.pop()
        n += 1
        r = _Recorder(text, forced)
        try:
            S.story(r)
        except _Choices as c:
            if c.viable:
                stack.extend(forced + [k] for k in reversed(c.viable))
                continue
        except S._Mismatch:
            pass
        else:
            if r.pos == len(text):
                return dict(r.confirmed), True
        if r.pos > best_pos:  # a dead path (or a whole story followed by more text)
            best_pos, best = r.pos, dict(r.confirmed)
        elif r.pos == best_pos:
            best = {k: v for k, v in best.items() if r.confirmed.get(k) == v}
    return best, False


def check(demands, text):
    """A tuple of booleans: which demands the text meets (exact, by parsing it)."""
    features, _ = parse(text)
    return tuple(met_by(k, v, features) for k, v in demands)


def score(demands, text):
    """The fraction of demands met, in [0, 1]: the ground-truth score of a reply."""
    met = check(demands, text)
    return sum(met) / len(met)


# ----------------------------------------------------------------------------------------------------
# a pre-training corpus in which copying pays


def demands_of(text):
    """The demands a complete story meets, read by parsing it: ((kind, value), ...) in DEMAND_KINDS order."""
    f, _ = parse(text)
    out = [("name", (f["gender"], f["name"]))] if "gender" in f and "name" in f else []
    out += [(k, f[k]) for k in ("home", "hobby") if k in f]
    out += [(k, f[k]) for k, plot in PLOT_OF.items() if f.get("plot") == plot and k in f]
    out += [("ending", f["ending"])] if "ending" in f else []
    return tuple(sorted(out, key=lambda d: DEMAND_KINDS.index(d[0])))


def series_document(seed, n_stories=(2, 3), p_keep=0.7):
    """Two or three stories that share features, as one pre-training document (stories only, no instruction).

    The first story is free; each later one keeps each of its features (the hero's name, home, hobby, the
    plot's animal, pet, thing or outing, the ending) with probability p_keep. The grammar names everything
    once, so a model trained on single stories never needs to look back more than a sentence; in a series,
    the stories before tell what comes next, and reading the context pays (what an instruction needs).
    """
    rng = random.Random(seed)
    first = write_story((), rng.randrange(2**31))
    kept = demands_of(first)
    texts = [first]
    for _ in range(rng.choice(list(n_stories)) - 1):
        texts.append(write_story(tuple(d for d in kept if rng.random() < p_keep), rng.randrange(2**31)))
    return "\n\n".join(texts)


def synopsis(demands):
    """A one-line summary naming some of a story's features, as a book's blurb does: "A story about a girl named
    Lily who lives by the sea and meets a fox. It ends with a lesson." A description, not a request, and no chat
    format: pre-training teaches to read a summary and write what it names; SFT teaches to read an instruction
    as one."""
    d = dict(demands)
    subject = f"a {d['name'][0]} named {d['name'][1]}" if "name" in d else "a child"
    say = {"home": "lives {}", "hobby": "loves to {}", "pet": "loses a {}", "thing": "finds a {}",
           "outing": "wants to {} on a rainy day"}
    clauses = [f"meets {S.article(d[k])} {d[k]}" if k == "animal" else say[k].format(d[k])
               for k in DEMAND_KINDS if k in d and k not in ("name", "ending")]
    text = f"A story about {subject}" + (" who " + " and ".join(clauses) if clauses else "") + "."
    return text + (f" It ends with a {d['ending']}." if "ending" in d else "")


def synopsis_document(seed):
    """A synopsis of 1 to 5 of a story's features (name, home, hobby, the plot's animal/pet/thing/outing, the
    ending), a blank line, then the story: text in which the words to write next were given at the top."""
    rng = random.Random(seed)
    story = write_story((), rng.randrange(2**31))
    features = list(demands_of(story))
    named = sorted(rng.sample(features, rng.randint(1, len(features))), key=lambda d: DEMAND_KINDS.index(d[0]))
    return synopsis(named) + "\n\n" + story


def pretraining_documents(n, seed, series_fraction=0.25, synopsis_fraction=0.5):
    """n documents: synopsis documents (a `synopsis_fraction`), series (a `series_fraction`), single stories
    (`stories.sample_story`, the rest). Stories only and summaries of them: never an instruction."""
    if not (0 <= series_fraction and 0 <= synopsis_fraction and series_fraction + synopsis_fraction <= 1):
        raise ValueError(f"series_fraction and synopsis_fraction must be >= 0 with a sum <= 1, got "
                         f"{series_fraction} and {synopsis_fraction}")
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        u, s = rng.random(), rng.randrange(2**31)
        docs.append(synopsis_document(s) if u < synopsis_fraction else series_document(s)
                    if u < synopsis_fraction + series_fraction else S.sample_story(s)[0])
    return docs
