"""CPRec kernels, imported as ``cprec_kernels`` (not ``kernels``: that name belongs to Hugging Face).

A small dispatcher picks, per call, between a pure-PyTorch reference and fast paths.
"""
