"""Test utilities shipped with the package: the one home of every helper tests and benchmarks share
(tests import helpers only from here and from conftest fixtures, never from another test module).

- distributed.py   pooled multi-process gloo harness (run_distributed)
- models.py        tiny model / parallel configs, random tokens
- pairs.py         PairBatches: synthetic (real collation) and hand-built (raw_pair_batch)
- attention.py     brute-force attention and the pair-model run of the attention / layout tests
- syncs.py         host-device sync counter
- reference.py     synthetic LongPO records and datasets, tiny reference checkpoints, HF float64 sums
- convert.py       tiny random HF checkpoints and a local BPE tokenizer
- generation.py    tiny chat model and synthetic documents
- evaluation.py    synthetic-task digests
- released.py      the authors' released tokenized schema (parquet / save_to_disk)
- e2e.py           the real CLIs under torchrun, quickstart inputs, run outputs
- gpu.py           visible GPUs and skip markers
- slurm.py         a private one-node Slurm for the sbatch template tests
"""
