import pytest

from megatron_longpo.testing.e2e import prepare_quickstart
from megatron_longpo.testing.gpu import gpu_nproc, visible_gpus


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="module")
def gpu_prepared(tmp_path_factory):
    """The e2e quickstart inputs (data, converted base, reference cache), sized to the visible GPUs."""
    if visible_gpus() == 0:
        pytest.skip("needs CUDA")
    return prepare_quickstart(tmp_path_factory.mktemp("gpu_quickstart"), nproc=gpu_nproc(2))
