"""The built-in corpus: short stories from a probabilistic grammar, with their exact probabilities.

Every story is written by `story(chooser)`, a plain function that makes all its random decisions through
`chooser.pick(options, weights)` and writes its text through `chooser.say(text)`. Because the generator
knows the probability of every decision, it knows the probability of every story it writes:

    -log p(story) = sum over its decisions of -log p(decision)

and the mean of that over many stories is the corpus's entropy, the lowest loss any model can reach.
That is only true if each text has exactly ONE derivation (if two decision sequences wrote the same
text, p(text) would be the sum of both and our number would be too high). `derivations(text)` checks
it by replaying the generator with every decision sequence that stays consistent with the text; the
tests run it on thousands of stories.

Per token: a model reads BOS story EOS BOS story EOS ... and predicts every token after the first.
The decision "which token comes next" is made by the grammar for each story token and for EOS (where
the story ends is part of p(story): every story ends with " The end." and no story is the beginning of
another, so EOS after a whole story is certain and nowhere else possible); the BOS after an EOS is
certain too (0 nats). So the floor per predicted token is

    sum over stories of -log p(story)  /  (number of tokens in the packed stream - 1)

which `entropy_per_token` computes for any tokenizer (the tokenizer only changes the denominator: a
tokenizer is a one-to-one map from text to token ids, so it cannot change the information).

The grammar is small enough that a 4M-parameter model learns most of it in two minutes, and large enough
(1.7 * 10^10 different stories: 20,736 openings x 104,472 plots x 8 endings; an entropy of ~20 nats
per story means about e^20 = 5 * 10^8 equally likely ones) that a model cannot memorise it.
"""
import math
import random

GIRLS = ["Lily", "Mia", "Emma", "Sara", "Anna", "Lucy", "Zoe", "Ella"]
BOYS = ["Tom", "Ben", "Max", "Leo", "Sam", "Jack", "Finn", "Noah"]
HERO_ADJECTIVES = ["little", "kind", "brave", "happy", "curious", "shy"]
HOMES = ["in a small house near the forest", "in a big city", "on a farm", "by the sea",
         "in a quiet village", "at the top of a hill"]
FAMILY = ["mom", "dad", "grandma", "grandpa", "big sister", "baby brother"]
HOBBIES = ["play outside", "read books", "draw pictures", "sing songs", "run in the grass", "build things"]
PLACES = ["park", "garden", "forest", "beach", "field", "yard"]
COLORS = ["red", "blue", "green", "yellow", "shiny", "tiny"]
THINGS = ["ball", "box", "key", "hat", "kite", "stone", "book", "cup"]
COVERS = ["tree", "rock", "bench", "bush"]
PETS = ["dog", "cat", "bunny", "bird", "puppy", "kitten"]
SPOTS = ["kitchen", "garden", "barn", "bedroom", "shed", "yard"]
ANIMALS = ["fox", "bear", "duck", "frog", "owl", "mouse", "rabbit", "turtle"]
# (what the animal feels, what it answers, what the hero does about it)
TROUBLES = [
    ("sad", "I lost my way home", "showed it the way home"),
    ("hungry", "I have not eaten all day", "gave it some bread"),
    ("cold", "The wind is too strong", "gave it a warm blanket"),
    ("scared", "There is a loud noise in the woods", "held it close until the noise stopped"),
]
OUTINGS = ["play in the park", "have a picnic", "fly a kite", "go to the beach"]
# (what to do inside, said now ; the same in the past tense)
INDOOR = [("build a fort", "built a big fort"), ("bake a cake", "baked a yummy cake"),
          ("play a game", "played a fun game"), ("paint a picture", "painted a pretty picture")]
FEELINGS = ["happy", "proud", "glad", "tired but happy"]
LESSONS = ["it is good to help others", "friends make everything better", "it is fun to share",
           "being kind is the best thing"]


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def story(c):
    """Write one story through the chooser `c`. Every decision is a `c.pick`; every text a `c.say`.

    Characters are named once; later they are "she", "he", "it" or "they". A model that has not yet
    learnt to copy a name from 50 tokens back (it takes longer than our two minutes) would otherwise
    write stories where the hero changes name halfway. What remains to look back for is short and
    structural: girl or boy for she/he, the animal's mood for its answer, the game for its past tense.
    """
    gender = c.pick(["girl", "boy"])
    name = c.pick(GIRLS if gender == "girl" else BOYS)
    he, his = ("She", "her") if gender == "girl" else ("He", "his")
    adj = c.pick(HERO_ADJECTIVES)
    c.say(f"Once upon a time, there was {article(adj)} {adj} {gender} named {name}.")
    c.say(f" {he} lived {c.pick(HOMES)} with {his} {c.pick(FAMILY)}.")
    c.say(f" {he} loved to {c.pick(HOBBIES)}.")
    plot = c.pick([plot_found, plot_lost_pet, plot_animal, plot_rain])
    plot(c, name, he, his)
    # the ending: a feeling or a lesson, then the same closing line for all
    if c.pick(["feeling", "lesson"]) == "feeling":
        c.say(f" At the end of the day, {he.lower()} was very {c.pick(FEELINGS)}.")
    else:
        c.say(f" {he} learned that {c.pick(LESSONS)}.")
    c.say(" The end.")


def plot_found(c, name, he, his):
    place, color, thing = c.pick(PLACES), c.pick(COLORS), c.pick(THINGS)
    c.say(f"\n\nOne day, {he.lower()} went to the {place}. There, {he.lower()} found a {color} {thing}"
          f" under a {c.pick(COVERS)}.")
    c.say(" \"" + c.pick(["Wow, look at this!", "What a nice find!", "Look what I found!"]) + f"\" {he.lower()} said.")
    friend = c.pick([n for n in GIRLS + BOYS if n != name])
    if c.pick(["share", "return"]) == "share":
        c.say(f" {he} ran to show it to {his} friend {friend}, who smiled and said, \"Let us play with it!\""
              " They played together all day.")
    else:
        c.say(f" {he} asked {his} friend {friend}, \"Is this yours?\"")
        c.say(f" \"Yes! I lost it yesterday,\" said {his} friend. \"Thank you!\"")


def plot_lost_pet(c, name, he, his):
    pet = c.pick(PETS)
    first = c.pick(SPOTS)
    second = c.pick([s for s in SPOTS if s != first])
    c.say(f"\n\nOne day, {he.lower()} could not find {his} {pet}. {he} was very sad.")
    c.say(f" {he} looked in the {first}, but it was not there.")
    c.say(f" Then {he.lower()} looked in the {second}, and there it was!")
    c.say(" \"" + c.pick(["I found you!", "There you are!"]) + f"\" {he.lower()} said, and gave it a big hug.")


def plot_animal(c, name, he, his):
    place, animal = c.pick(PLACES), c.pick(ANIMALS)
    mood, answer, help_ = c.pick(TROUBLES)
    c.say(f"\n\nOne day, {he.lower()} went to the {place} and met {article(animal)} {animal}. It looked {mood}.")
    c.say(f" \"What is wrong?\" {he.lower()} asked. \"{answer},\" it said.")
    c.say(f" {he} {help_}. It smiled and said, \"Thank you!\"")


def plot_rain(c, name, he, his):
    friend = c.pick([n for n in GIRLS + BOYS if n != name])
    outing = c.pick(OUTINGS)
    inside, did = c.pick(INDOOR)
    c.say(f"\n\nOne day, {he.lower()} and {his} friend {friend} wanted to {outing}.")
    c.say(" But then, dark clouds came and it started to rain. \"Oh no!\" they said.")
    c.say(f" {he} had an idea. \"Let us {inside} inside!\" They {did} and had a lot of fun.")


# ----------------------------------------------------------------------------------------------------
class Sampler:
    """Makes decisions with a seeded `random.Random` and adds up their log-probabilities."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.parts, self.logp, self.n_decisions = [], 0.0, 0

    def pick(self, options, weights=None):
        weights = [1] * len(options) if weights is None else weights
        total = sum(weights)
        r = self.rng.randrange(total)  # exact integer draw: p(option i) is exactly weights[i] / total
        for option, w in zip(options, weights):
            if r < w:
                self.logp += math.log(w / total)
                self.n_decisions += 1
                return option
            r -= w
        raise AssertionError("unreachable")

    def say(self, text):
        self.parts.append(text)


def sample_story(seed):
    """-> (text, log p(text)): story number `seed`; the same seed always gives the same story."""
    s = Sampler(seed)
    story(s)
    return "".join(s.parts), s.logp


def corpus(n_stories, seed=0):
    """-> (texts, logps): n_stories stories; story i of corpus `seed` depends only on (seed, i)."""
    if n_stories < 0:
        raise ValueError(f"n_stories must be >= 0, got {n_stories}")
    texts, logps = [], []
    for i in range(n_stories):
        text, logp = sample_story(seed * 1_000_003 + i)
        texts.append(text)
        logps.append(logp)
    return texts, logps


# ----------------------------------------------------------------------------------------------------
class _Branch(Exception):
    """Raised by _Replayer when it runs out of forced decisions: the next decision has n options."""

    def __init__(self, n):
        self.n = n


class _Mismatch(Exception):
    """The text written so far is no longer a prefix of the target: this decision path is dead."""


class _Replayer:
    """Replays a fixed list of decision indices and checks the text against `target` as it is written."""

    def __init__(self, target, forced):
        self.target, self.forced = target, forced
        self.i, self.pos, self.logp = 0, 0, 0.0

    def pick(self, options, weights=None):
        weights = [1] * len(options) if weights is None else weights
        if self.i == len(self.forced):
            raise _Branch(len(options))
        k = self.forced[self.i]
        self.i += 1
        self.logp += math.log(weights[k] / sum(weights))
        return options[k]

    def say(self, text):
        if not self.target.startswith(text, self.pos):
            raise _Mismatch()
        self.pos += len(text)


def derivations(text, limit=10, grammar=story):
    """All decision sequences (up to `limit`) that make the grammar write exactly `text`, with log p.

    Depth-first search over decisions: replay the generator with a prefix of decisions; when it asks
    for one more, try every option; drop a path as soon as its text stops matching. A text from the
    grammar must come back with exactly one derivation, whose log p is the one the sampler reported.
    """
    found, stack = [], [[]]
    while stack and len(found) < limit:
        forced = stack.pop()
        r = _Replayer(text, forced)
        try:
            grammar(r)
        except _Branch as b:
            stack.extend(forced + [k] for k in reversed(range(b.n)))
            continue
        except _Mismatch:
            continue
        if r.pos == len(text):
            found.append((forced, r.logp))
    return found


def entropy_per_token(logps, n_tokens_per_story):
    """The floor of the mean next-token loss, in nats per predicted token, for a packed stream.

    logps: log p of each story; n_tokens_per_story: its token count WITHOUT BOS/EOS. The stream holds
    BOS + tokens + EOS per story; every token but the first is predicted, and BOS after EOS costs 0.
    """
    total_nats = -sum(logps)
    n_predicted = sum(n + 2 for n in n_tokens_per_story) - 1
    return total_nats / n_predicted


def entropy_per_story(n_stories=2000, seed=12345):
    """Monte Carlo estimate of H = E[-log p(story)] in nats, with its standard error."""
    _, logps = corpus(n_stories, seed)
    nll = [-x for x in logps]
    mean = sum(nll) / len(nll)
    var = sum((x - mean) ** 2 for x in nll) / max(1, len(nll) - 1)
    return mean, math.sqrt(var / len(nll))
