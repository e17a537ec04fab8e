"""megatron_longpo: LongPO (short-to-long preference optimization) on Megatron-Core."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="megatron_longpo",
    version="0.1.0",
    description="LongPO short-to-long preference optimization for 128K-512K contexts on Megatron-Core",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_longpo", "megatron_longpo.*"]),
    package_data={"megatron_longpo": ["py.typed"], "megatron_longpo.generation": ["prompts.yaml"]},
    install_requires=[
        # torch is a floor only: CPU machines install the CPU wheel first (scripts/setup_env.sh),
        # CUDA clusters keep their own build. Never let pip pick a CUDA torch for a CPU box.
        "torch>=2.6",
        "megatron-core==0.16.1",  # API churns between minor releases; pinned
        "numpy",
        "packaging>=24.2",
        "sentencepiece",
        "transformers>=4.40",
        "safetensors",
        "pyyaml",
        "psutil",
        "tqdm",
        "tensorboard",
        "pyarrow",  # the released LongPO data is parquet (tools/import_released_data.py)
    ],
    extras_require={
        "wandb": ["wandb"],
        "plot": ["matplotlib"],  # tools/evaluate.py --plot (accuracy vs length PNG)
        # Transformer Engine: the range megatron-core 0.16.1 is tested with (its pyproject, extra
        # dev). TE >= 2.16.1 refuses to load the pickled FP8 state it saves (docs/install.md).
        # Inside an NGC container install without this extra: the container's TE and torch stay.
        "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0"],
        # flash-attn 2 (parallel.attention_backend=flash), optional: H100 runs use SDPA or TE's
        # cuDNN attention; it has no wheel for every torch/CUDA and then builds for hours.
        "flash": ["flash-attn>=2.6,<2.9"],
        "dev": ["pytest>=8", "pytest-timeout", "matplotlib"],  # the PNG outputs are tested
        # self-evolution data generation at scale (tools/generate_longpo_data.py --backend vllm)
        "vllm": ["vllm>=0.8"],
    },
)
