"""Install: pip install torch==2.13.0 && pip install -e .[test]  (torch first: see README)."""
from setuptools import find_packages, setup

setup(
    name="ad2-ds",
    version="0.1.0",
    description="Task-specific knowledge distillation of transformers with adversarial data augmentation (AD2) "
    "on DeepSpeed",
    packages=find_packages(include=["ad2_ds", "ad2_ds.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=4.40",
        "datasets>=2.18",
        "accelerate>=0.30",
        "sentencepiece",
        "evaluate>=0.4",
        "scikit-learn",
        "scipy",
        "safetensors",
        "tqdm",
    ],
    # bench: benchmarks/plot_results.py; the TextBrewer peer is installed with --no-deps (see docs/RESULTS.md)
    extras_require={"test": ["pytest>=7"], "bench": ["matplotlib", "tensorboardX"]},
)
