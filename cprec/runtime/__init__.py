"""What the training and the evaluation job both stand on (and which imports neither of them).

- `dist`: rank and world size from torchrun / the deepspeed launcher / SLURM; the process group.
- `engine`: a DeepSpeed engine from an explicit `EngineSpec` (batch, AdamW, precision, ZeRO stage).
- `checkpoint`: atomic step folders, the one resolver of "which checkpoint does this path mean",
  engine save/load, universal conversion, RNG state.
- `tracking`: MLflow on rank 0 (or nothing), resumable runs.
- `export`: a DeepSpeed checkpoint -> a Hugging Face model folder.
- `faults`: the one fault-injection seam the tests use (a no-op in a normal run).
"""
