"""cnnlab: run, compare and report CNN image-classification experiments.

    import cnnlab
    run = cnnlab.train("recipes/demo.yaml")            # -> Run (.history, .metrics, .model, .path)
    run = cnnlab.load_run("runs/demo")
    cnnlab.predict(run, ["cat.png"], top_k=3)
    cnnlab.evaluate(run)                                 # re-evaluate on the saved test split
    cnnlab.create_model("harahap-cnn", num_classes=10)   # registry: cnnlab.list_models()
"""

from ._version import __version__  # noqa: E402

from .config import Config, ConfigError, load_config  # noqa: E402
from .data import list_datasets, load_source  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .runs import Run, load_run  # noqa: E402


def __getattr__(name):
    """train / evaluate / predict load the training stack on first use, so `cnnlab.report`
    and `cnnlab.study` can be imported without it."""
    if name in ("train", "evaluate", "predict"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")

__all__ = ["train", "evaluate", "predict", "load_run", "Run", "Config", "ConfigError", "load_config",
           "create_model", "list_models", "list_datasets", "load_source", "__version__"]
