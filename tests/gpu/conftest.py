import pytest
import torch


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.gpu)


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_nproc(want: int = 2) -> int:
    """Processes per node for a GPU test: at most ``want``, never more than the visible GPUs."""
    return max(1, min(want, visible_gpus()))


def needs_gpus(n: int):
    return pytest.mark.skipif(visible_gpus() < n, reason=f"needs {n} visible GPUs, have {visible_gpus()}")


@pytest.fixture(scope="module")
def gpu_prepared(tmp_path_factory):
    """The e2e quickstart inputs (data, converted base, reference cache), sized to the visible GPUs."""
    if visible_gpus() == 0:
        pytest.skip("needs CUDA")
    from tests.e2e.test_train import PY, _run, _torchrun

    d = tmp_path_factory.mktemp("gpu_quickstart")
    _run([PY, "tools/preprocess_data.py", "--input", "examples/data/sample_longpo.jsonl", "--tokenizer",
          "examples/data/tokenizer.model", "--output-prefix", d / "data/train", "--max-seq-length", "2048",
          "--no-progress"])
    _run([PY, "examples/make_tiny_base_model.py", "--out", d / "hf_base"])
    _run([PY, "tools/convert_hf_to_megatron.py", "--hf-dir", d / "hf_base", "--out", d / "base", "--dtype", "fp32"])
    _run(_torchrun(gpu_nproc(2), "tools/precompute_reference.py", "--load", d / "base", "--data", d / "data/train",
                   "--output", d / "ref_cache", "--mode", "longpo"))
    return d
