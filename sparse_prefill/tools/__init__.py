"""The command-line tools built on sparse_prefill: evaluation, calibration, the demo and config checks.

Nothing in the library imports this package; each module here imports the library like any user would.

* eval: ``sparse-prefill-eval``, a patched model against itself dense (accuracy, fidelity, latency, density).
* calibrate: ``sparse-prefill-calibrate``, a per-head config from recall and density measured on dense q/k.
* demo: ``sparse-prefill-demo`` / ``make demo``, the passkey demo on the embedded SmolLM2.
* check_config: a config's next-token fidelity on held-out text; compare_evals: eval runs side by side.
* tasks (+ data/filler.json), prompts, datasets_eval, metrics: the prompts, public benchmark readers and scorers.
* cli, markdown, models, plots: argument types and the length rule, report tables, model loading, figures.
"""
