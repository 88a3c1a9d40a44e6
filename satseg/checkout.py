"""Where a source checkout keeps the bundled demo model and the versioned Triton model repository.

An installed wheel (``pip install .``) carries neither: there the commands that default to them ask for an
explicit ``--checkpoint`` or repository instead, in one line that says where to get one.
"""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
IN_CHECKOUT = (_ROOT / "pyproject.toml").is_file()
"""Whether ``satseg`` runs from its source checkout (an editable install), not from an installed wheel."""
BUNDLED_CHECKPOINT = _ROOT / "models" / "demo"
"""The bundled demo model of the checkout (models/demo/README.md is its card)."""
DEFAULT_REPOSITORY = _ROOT / "triton_repo"
"""The versioned repository of the checkout (``sat-export`` fills its built artefacts)."""
GET_A_CHECKPOINT = (
    "pass --checkpoint DIR (or set SATSEG_CHECKPOINT), a folder with config.json and model.safetensors: "
    "models/demo of the source repository, `sat-import` of a published SAT checkpoint, or `sat-checkpoint init` "
    "for an untrained trial"
)
GET_A_REPOSITORY = (
    "pass a model repository built by `sat-export CHECKPOINT --repository DIR` (in the source repository: "
    "`just export`, which fills triton_repo/)"
)
VIEWER_DEPLOYMENT = _ROOT / "deploy" / "k8s" / "viewer"
"""The OHIF viewer's deployment: its npm pin (``ohif.json``) and ``app-config.js``, which the demo serves too."""
