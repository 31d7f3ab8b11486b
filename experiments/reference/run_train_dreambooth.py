"""Run diffusers' ``examples/dreambooth/train_dreambooth.py`` unmodified on a CPU-only machine without torchvision.

    python experiments/reference/run_train_dreambooth.py PATH/TO/train_dreambooth.py [its flags ...]

The PyPI torchvision wheel links CUDA libraries a CPU-only machine lacks, and the script needs only five image
transforms from it. transformers and diffusers are imported first, so they record torchvision as absent (as it is);
then ``transforms_shim`` stands in for ``torchvision.transforms`` and the script runs as ``__main__``.
"""
from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import diffusers  # noqa: F401  (import order matters: see the docstring)
import transformers  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))
import transforms_shim  # noqa: E402

torchvision = types.ModuleType("torchvision")
torchvision.transforms = transforms_shim
sys.modules.update({"torchvision": torchvision, "torchvision.transforms": transforms_shim})

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
