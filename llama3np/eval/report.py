"""Accuracies with their 95% intervals, and the per-subject table.

micro = correct / all questions; macro = the mean of the subjects' accuracies (what Llama's reports use:
every subject weighs the same, however many questions it has).
Intervals: Wilson's score interval for a binomial proportion (micro and each subject; unlike the normal
approximation it stays inside [0, 1] and is sensible at 0% or 100% with few questions); for macro, the
normal approximation with var = sum_s acc_s (1 - acc_s) / n_s / S^2 (the subjects are independent).
"""
import math

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson_interval(correct, n, z=Z95):
    """[lo, hi] of the 95% Wilson score interval of correct/n; [0, 1] when n == 0."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = centre - half, centre + half
    # at 0/n and n/n the bound is exactly 0 or 1 (the formula gives it up to a rounding)
    return [0.0 if correct == 0 else max(0.0, lo), 1.0 if correct == n else min(1.0, hi)]


def summarize(items):
    """items (dicts with "subject" and "correct") -> micro, macro, their intervals, per-subject rows, items."""
    subjects = {}
    for it in items:
        s = subjects.setdefault(it["subject"], {"correct": 0, "n": 0})
        s["correct"] += int(bool(it["correct"]))
        s["n"] += 1
    for s in subjects.values():
        s["count"] = s["n"]  # the name for it; "n" is the statistician's
        s["accuracy"] = s["correct"] / s["n"]
        s["ci95"] = wilson_interval(s["correct"], s["n"])
    n = sum(s["n"] for s in subjects.values())
    correct = sum(s["correct"] for s in subjects.values())
    micro = correct / n if n else float("nan")
    accs = [s["accuracy"] for s in subjects.values()]
    macro = sum(accs) / len(accs) if accs else float("nan")
    if accs:
        se = math.sqrt(sum(s["accuracy"] * (1 - s["accuracy"]) / s["n"] for s in subjects.values())) / len(accs)
        macro_ci = [max(0.0, macro - Z95 * se), min(1.0, macro + Z95 * se)]
    else:
        macro_ci = [0.0, 1.0]
    return dict(micro=micro, macro=macro, micro_ci95=wilson_interval(correct, n), macro_ci95=macro_ci,
                n=n, correct=correct, subjects=subjects, items=list(items))


def format_table(result, title=None):
    """The per-subject table as text: subject, n, accuracy and its interval, then micro and macro."""
    rows = [(name, s["n"], s["accuracy"], s["ci95"]) for name, s in result["subjects"].items()]
    width = max([len("subject")] + [len(r[0]) for r in rows] + [len("macro (mean of subjects)")])
    lines = [title] if title else []
    lines.append(f"{'subject':<{width}}  {'n':>5}  {'acc':>6}  95% interval")
    for name, n, acc, (lo, hi) in rows:
        lines.append(f"{name:<{width}}  {n:>5}  {acc:6.1%}  [{lo:.1%}, {hi:.1%}]")
    lines.append("-" * (width + 32))
    lo, hi = result["micro_ci95"]
    lines.append(f"{'micro (all questions)':<{width}}  {result['n']:>5}  {result['micro']:6.1%}  [{lo:.1%}, {hi:.1%}]")
    lo, hi = result["macro_ci95"]
    lines.append(f"{'macro (mean of subjects)':<{width}}  {len(rows):>5}  {result['macro']:6.1%}  [{lo:.1%}, {hi:.1%}]")
    return "\n".join(lines)
