"""The built-in demo and the tiny models, above both halves (it imports ``kd_cache`` and ``student``).

- ``tiny``: tiny *real* models, tokenizers, processors and datasets, built offline (tests, demo,
  benchmarks).
- ``task``: the demo's synthetic visual task (scenes drawn with Pillow, questions, dataset files).
- ``config``: ``DemoConfig``, the sizes and schedule of one demo run.
- ``run``: ``run_demo``, every step of the demo (the ``kd-demo`` command).
- ``report``: the demo's loss curves, per-question accuracy and printed table.
- ``verdict``: per-question KL, and the distilled student's margins over the baseline in standard errors.
- ``cross``: ``--cross-tokenizer``'s KL of a student of another tokenizer, template or image grid to the
  teacher's cache, through kd-train's alignment.
- ``ablation``: ``kd-demo --ablation``, the paper's ablation over seeds (table and plot).
"""
