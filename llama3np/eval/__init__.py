"""Evaluation: MMLU's k-shot prompt byte for byte, scored by log-likelihood, fast, on data that is here.

    mmlu.py        format_prompt (lm-evaluation-harness's and hendrycks' templates), evaluate
    scoring.py     log P(continuation | context); the shared k-shot prefix's KV cache (PrefixCache)
    data.py        hendrycks CSV folders, cais/mmlu parquet, the harness's 282 CoT dev questions
    story_mmlu.py  an MMLU-format benchmark generated from the story grammar (answers known)
    generative.py  0-shot chain of thought in the chat template, greedy, the answer letter extracted
    robustness.py  accuracy under other label sets, answer orders and all-same-answer shots (+ plot)
    report.py      accuracies with 95% intervals, the per-subject table
    cli.py         `llama3np eval mmlu --model DIR ...` (resumable, JSON results)
"""
