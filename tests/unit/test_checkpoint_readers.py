"""Every reader of checkpoint tensors goes through the one verified load path (issue 25 item 1):
``checkpoint.model_io.load_sharded`` verifies the manifest before it calls ``dist_checkpointing.load``.
A new tool that read tensors another way would skip verification; this test names it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOADERS = {"load", "load_state_dict", "load_common", "load_tensors_metadata", "load_plain_tensors"}


def _calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOADERS:
            base = ast.unparse(node.func.value)
            if "dist_checkpointing" in base or base in ("dcp", "torch.distributed.checkpoint"):
                yield node.lineno, ast.unparse(node.func)


def test_dist_checkpointing_load_only_in_the_verified_path():
    found = []
    for path in [*ROOT.glob("megatron_longpo/**/*.py"), *ROOT.glob("tools/*.py"), ROOT / "pretrain_longpo.py"]:
        for line, call in _calls(path):
            found.append(f"{path.relative_to(ROOT)}:{line}: {call}")
    assert found == [f"megatron_longpo/checkpoint/model_io.py:{_load_line()}: dist_checkpointing.load"], found


def _load_line() -> int:
    src = (ROOT / "megatron_longpo/checkpoint/model_io.py").read_text().splitlines()
    fn = next(i for i, ln in enumerate(src) if ln.startswith("def load_sharded("))
    verify = next(i for i in range(fn, len(src)) if "verify_checkpoint(iter_dir, verify)" in src[i])
    return next(i for i in range(verify, len(src)) if "dist_checkpointing.load(" in src[i]) + 1
