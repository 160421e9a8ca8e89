"""Efficiency of ATP: FLOPs, KV-cache bytes and prefill timing across attention backends.

- :mod:`.flops` — one analytic per-layer FLOPs formula, cross-checked with ``FlopCounterMode``;
- :mod:`.kv_cache` — vision-token key/value bytes read from the real cache, and the analytic value;
- :mod:`.models` — the 32-layer timing model and the kept-token schedule solver;
- :mod:`.timing` — prefill timing (image encoding + transformer forward), per-layer backends;
- :mod:`.strategies` — supplementary Table 3's strategies plus ours, timed in one run;
- :mod:`.report` — ratios, targets, Table 3 cells and the claims checked.

``atp-repro bench`` (:mod:`.commands`) runs the benchmark from the command line.
"""
