"""The mini world: a procedurally generated VQA task and a small LLaVA trained on CPU.

Modules (one idea each): :mod:`.scenes` (deterministic scene images), :mod:`.questions`
(question families), :mod:`.tokenizer` (word-level tokenizer built in code), :mod:`.data` (splits
and batching), :mod:`.model` (small LLaVA from HF config classes), :mod:`.train` (training loop),
:mod:`.cache` (content-addressed artifact cache), :mod:`.runs` (cached upper-bound and ATP runs),
:mod:`.evaluate` (accuracy per family, Avg. Rate, tokens).
"""
