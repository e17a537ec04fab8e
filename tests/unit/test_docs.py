"""docs/configuration.md is generated from the config dataclasses and must not go stale."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current():
    p = subprocess.run([sys.executable, "tools/gen_config_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_every_config_field_has_help():
    import dataclasses

    from megatron_longpo.config import LongPOConfig

    for section in dataclasses.fields(LongPOConfig):
        for f in dataclasses.fields(section.default_factory()):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help text"
