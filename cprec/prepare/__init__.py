"""The offline job, `cprec prepare`: raw logs -> tokenized WebDataset shards + manifest + eval inputs.

``readers`` (one module per source) -> ``clean`` -> ``split`` -> ``prompts`` -> ``documents`` ->
``tokenize`` -> ``shards``, run by ``pipeline``. What it writes is described by ``cprec.manifest``.
"""
