"""Self-evolution data generation: long documents -> LongPO preference records (docs/generation.md).

Stages (one module each): ``chunking`` -> ``questions`` -> ``answers`` -> ``filters`` ->
``grouping``; ``pipeline`` runs them on a batch of documents, ``backends`` generate (hf, vllm,
openai), ``driver`` shards / resumes / merges, ``cli`` is tools/generate_longpo_data.py.
"""
