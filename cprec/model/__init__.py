"""The causal LM: ``build`` (from a config or a local HF folder), ``packed`` (packed-sequence training
wrapper wiring the ``cprec_kernels`` dispatcher into transformers), ``flops`` (parameter and FLOP counts).
"""
