"""How much an MMLU number moves with choices that should not matter (Llama 3 paper, section 5.1.2).

Three families of variants, each re-scoring the same questions with the same model:
- label sets: the letters A/B/C/D replaced by 1/2/3/4, by the language-independent $ & # @, and by the
  paper's rare tokens œ § з ü (the two sets of Alzahrani et al., 2024, that the paper uses);
- answer order: every question's (and shot's) choices rotated by r = 0..3 places, so the gold answer
  sits at each position in turn;
- all-same-answer shots: the k shots' choices reordered so that every shot's answer is the same letter
  (A, then B, C, D); the question is unchanged.
The spread of a family is max - min of its accuracies (micro). `plot_robustness` draws the three
families side by side.
"""
from ..fileio import atomic_write
from .mmlu import LETTERS, evaluate

LABEL_SETS = {"A B C D": LETTERS, "1 2 3 4": ("1", "2", "3", "4"), "$ & # @": ("$", "&", "#", "@"),
              "œ § з ü": ("œ", "§", "з", "ü")}


def permute_choices(q, order):
    """q with choices [q.choices[order[0]], ...]; the answer follows its choice."""
    return dict(q, choices=[q["choices"][j] for j in order], answer=list(order).index(q["answer"]))


def rotate(q, r):
    """Choices rotated r places to the right: the gold answer moves from position a to (a + r) % n."""
    n = len(q["choices"])
    return permute_choices(q, [(i - r) % n for i in range(n)])


def gold_at(q, position):
    """q with its gold choice swapped into `position` (the other choices keep their places)."""
    order = list(range(len(q["choices"])))
    order[position], order[q["answer"]] = order[q["answer"]], order[position]
    return permute_choices(q, order)


def _map(questions, f):
    return {s: [f(q) for q in items] for s, items in questions.items()}


def robustness_report(model, tokenizer, questions, dev, k_shot=5, style="harness", **kw):
    """{"label_sets": {name: acc}, "answer_order": {"+r": acc}, "same_answer_shots": {"all A": acc, ...},
    "spread": {family: max - min}}: micro accuracies of every variant (kw go to `evaluate`)."""
    def acc(qs, ds, labels=LETTERS):
        return evaluate(model, tokenizer, qs, ds, k_shot, style, labels=labels, **kw)["micro"]

    out = {"label_sets": {name: acc(questions, dev, labels) for name, labels in LABEL_SETS.items()}}
    out["answer_order"] = {f"+{r}": acc(_map(questions, lambda q: rotate(q, r)), _map(dev, lambda q: rotate(q, r)))
                           for r in range(4)}
    out["same_answer_shots"] = {f"all {L}": acc(questions, _map(dev, lambda q: gold_at(q, i)))
                                for i, L in enumerate(LETTERS)}
    out["spread"] = {family: max(v.values()) - min(v.values()) for family, v in out.items()}
    return out


def plot_robustness(rep, path=None, title="MMLU accuracy under variants that should not matter"):
    """A matplotlib Figure (three panels: label sets, answer order, same-answer shots); saved atomically
    to `path` (.png) if given. Uses a Figure object, not pyplot, so it never changes the backend."""
    from matplotlib.figure import Figure

    families = [("label_sets", "label set"), ("answer_order", "choices rotated by"),
                ("same_answer_shots", "every shot's answer")]
    fig = Figure(figsize=(10, 3.4))
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (key, xlabel) in zip(axes, families):
        names, values = list(rep[key]), list(rep[key].values())
        ax.bar(range(len(values)), [100 * v for v in values], color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(names)
        ax.axhline(25, color="k", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_title(f"spread {100 * rep['spread'][key]:.1f} points", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy (%)  (dashed: chance)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    if path is not None:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return fig
