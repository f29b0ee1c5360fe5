"""Student side of the toolkit: everything about training, never the teacher.

- ``student.model``: compose a student (vision tower + fresh MLP projector + LLM) as a plain
  ``LlavaForConditionalGeneration``, load it, check it against a cache manifest.
- ``student.stages``: the DPT / SFT / DFT recipes (trained modules, learning rate, losses).
- ``student.stream``: the streaming, resumable ``IterableDataset`` over a teacher cache.
- ``student.losses``: the loss functions (sparse divergences, chunked CE + KD, RDist).
- ``student.distill``: the distillation forward pass (hidden states -> loss sums).
- ``student.config``: ``TrainConfig``, every setting of ``kd-train train`` with its flag's help.
- ``student.cache_checks``: refusals of options the cache was not built for.
- ``student.checkpoints``: checkpoints, resumption and the final model in ``OUT``.
- ``student.train``: the training step and loop behind ``kd-train``.
- ``student.eval_config``: ``EvalConfig``, every setting of ``kd-eval`` with its flag's help.
- ``student.evaluate``: ``kd-eval`` (QA accuracy; KL and top-1 agreement with the teacher on a cache).
"""
