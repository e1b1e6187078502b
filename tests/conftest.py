import os
from pathlib import Path

import pytest

# Same as the CLI: passive OpenMP waits, so several torch processes on 2 cores do not spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The embedded model, converted once per test session into a shared cache directory."""
    from node.weights import prepare_model

    from node.weights import MODEL_CACHE_ENV

    cache = tmp_path_factory.mktemp("models") / "smollm2-135m"
    prepare_model(cache)
    os.environ[MODEL_CACHE_ENV] = str(cache)  # the poolai processes tests start find it there too
    return cache


TRIO_DIRS = ("node", "protocol", "e2e")  # the TUI tests run on asyncio


def pytest_collection_modifyitems(config, items):
    """trio mode per directory: async tests under tests/{node,protocol,e2e} run on trio."""
    import inspect

    root = Path(__file__).parent
    for item in items:
        fn = getattr(item, "obj", None)
        if fn is None or not inspect.iscoroutinefunction(fn):
            continue
        try:
            top = Path(item.fspath).relative_to(root).parts[0]
        except ValueError:
            continue
        if top in TRIO_DIRS:
            item.add_marker(pytest.mark.trio)
