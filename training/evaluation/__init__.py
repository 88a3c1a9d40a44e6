"""The evaluation stage's parts: metrics, cases, prompts and reports (``sat-evaluate``, the CLI that runs them,
is :mod:`satseg_training.evaluate`)."""
