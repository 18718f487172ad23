"""An MMLU-format benchmark generated from the built-in story grammar, with answers known from the grammar.

Each question is the beginning of a story from `llama3np.data.stories`, cut just before a part that the
grammar decides from what came before; the four choices are the four ways the grammar could continue
there, and the gold one is what it writes after THIS beginning:

    story_remedies   the animal looked hungry / cold / sad / scared -> what the hero did about it
    animal_answers   the animal looked hungry ... -> what it answered to "What is wrong?"
    past_tense       "Let us bake a cake inside!" -> "They baked a yummy cake ..."
    pronouns         "... a kind girl named Lily." -> "She lived ... with her mom." (not He, not his)
    story_endings    the whole story but its last words -> " The end."

A model trained on the stories has seen every one of these continuations many times, so in the "cloze"
style (the question continued by each choice's text) it can show this knowledge without ever having
seen a lettered multiple-choice question. The gold letter is balanced: each of A-D is gold for a quarter
of each subject's questions (the rest of the choice order is shuffled), so a model that always prefers
one letter scores 25% exactly when n is a multiple of 4.
"""
import random

from ..data import stories

SUBJECTS = ("story_remedies", "animal_answers", "past_tense", "pronouns", "story_endings")
PLOTS = {"story_remedies": stories.plot_animal, "animal_answers": stories.plot_animal,
         "past_tense": stories.plot_rain, "pronouns": None, "story_endings": None}
# Distractors as long as the gold answer in tokens (a sum of log-probabilities favours shorter choices,
# so with choices of unequal length even a random model would beat 25% in the cloze style).
ENDING_DISTRACTORS = ("The day.", "The sea.", "The box.")


class _PlotSampler(stories.Sampler):
    """The story sampler, with the plot decision forced (the other decisions stay random and seeded)."""

    def __init__(self, seed, plot=None):
        super().__init__(seed)
        self.plot = plot

    def pick(self, options, weights=None):
        if self.plot is not None and self.plot in options:
            return self.plot
        return super().pick(options, weights)


def _story(seed, plot=None):
    s = _PlotSampler(seed, plot)
    stories.story(s)
    return "".join(s.parts)


def _cut(text, marker):
    """(text before `marker`'s first occurrence, the marker and what follows it) or None if absent."""
    i = text.find(marker)
    return None if i < 0 else (text[:i], text[i:])


def _remedy(text):
    for _, _, help_ in stories.TROUBLES:
        for he in ("She", "He"):
            cut = _cut(text, f"it said. {he} {help_}.")
            if cut:
                return cut[0] + f"it said. {he}", f"{help_}.", [f"{h}." for _, _, h in stories.TROUBLES]


def _answer(text):
    for _, answer, _ in stories.TROUBLES:
        cut = _cut(text, f" \"{answer},\" it said.")
        if cut:
            return cut[0], f"\"{answer},\" it said.", [f"\"{a},\" it said." for _, a, _ in stories.TROUBLES]


def _past(text):
    for inside, did in stories.INDOOR:
        cut = _cut(text, f" They {did} and had a lot of fun.")
        if cut:
            options = [f"{d} and had a lot of fun." for _, d in stories.INDOOR]
            return cut[0] + " They", f"{did} and had a lot of fun.", options


def _pronoun(text):
    """The hero's second sentence with she/he and her/his in all four combinations: one agrees with the
    girl or boy of the first sentence, as the grammar writes it; all four are the same number of tokens."""
    first, rest = text.split(".", 1)
    sentence = rest.split(".", 1)[0].strip() + "."  # "She lived in a big city with her mom."
    word, tail = sentence.split(" ", 1)
    his = "her" if word == "She" else "his"
    body = tail.replace(f" {his} ", " {} ")
    options = [f"{w} {body.format(p)}" for w in ("She", "He") for p in ("her", "his")]
    return first + ".", sentence, options


def _ending(text):
    end = " The end."
    assert text.endswith(end)
    return text[: -len(end)], end.strip(), [end.strip(), *ENDING_DISTRACTORS]


CUTTERS = {"story_remedies": _remedy, "animal_answers": _answer, "past_tense": _past, "pronouns": _pronoun,
           "story_endings": _ending}


def make_question(subject, seed, gold_position):
    """One question of `subject` from story number `seed`, its gold choice at `gold_position` (0-3)."""
    text = _story(seed, PLOTS[subject])
    question, gold, options = CUTTERS[subject](text)
    assert gold in options and len(set(options)) == 4, (subject, gold, options)
    rng = random.Random(seed)
    others = [o for o in options if o != gold]
    rng.shuffle(others)
    choices = others[:gold_position] + [gold] + others[gold_position:]
    return dict(question=question, choices=choices, answer=gold_position)


def generate(n_per_subject=20, seed=0, subjects=SUBJECTS):
    """subject -> n questions (gold letters balanced: position i % 4, in a shuffled order)."""
    unknown = [s for s in subjects if s not in CUTTERS]
    if unknown:
        raise ValueError(f"unknown story subject(s) {unknown}; expected some of {SUBJECTS}")
    if n_per_subject < 0:
        raise ValueError(f"n_per_subject must be >= 0, got {n_per_subject}")
    out = {}
    for k, subject in enumerate(subjects):
        positions = [i % 4 for i in range(n_per_subject)]
        random.Random(f"{seed}-{subject}").shuffle(positions)
        base = (seed * 1_000_003 + k * 100_003) * 7 + 12_345_679  # disjoint from the training corpus seeds
        out[subject] = [make_question(subject, base + i, positions[i]) for i in range(n_per_subject)]
    return out


def generate_split(n_test=20, n_dev=5, seed=0, subjects=SUBJECTS):
    """(questions, dev): two disjoint generated sets (dev from another seed), for k-shot evaluation."""
    return generate(n_test, seed, subjects), generate(n_dev, seed + 1, subjects)
