"""qvlm_eval: the evaluation lab of qvlm-modifiers (not part of the plugin that ``pip install`` ships).

Installed from this folder (``pip install -e eval``; ``bash install.sh eval`` does it) as its own
distribution, ``qvlm-eval``. What it holds:

- :mod:`qvlm_eval.default_model`: the embedded default VLM (SmolLM2-135M + the committed tiny vision
  tower in ``weights/``, package data) that the main job and the matrix quantize;
- :mod:`qvlm_eval.metrics`: VQA accuracy, answer-token KL (the definition is the product's
  :mod:`qvlm_modifiers.scoring`), text perplexity, checkpoint size; ``python -m qvlm_eval.metrics``;
- :mod:`qvlm_eval.main_job`: one quantize -> save -> reload -> measure job;
- :mod:`qvlm_eval.run_experiments`: the experiment matrix (``experiments.yaml``), cached by cell key;
- studies and benchmarks (``train_vision``, ``sweep_vision_opt``, ``diagnose_qvlm``, ``bench_*``).

Scripts run as ``python eval/NAME.py`` or ``python -m qvlm_eval.NAME``; tests import the modules.
"""
