"""flashvit: a Vision Transformer whose hot layers are Triton kernels.

The top-level folders kernels/, vit/ and bench/ install as flashvit.kernels, flashvit.vit and
flashvit.bench (`kernels`, `vit` and `bench` are taken on PyPI).
"""

from setuptools import setup

_TRITON = "triton>=3.6; platform_system == 'Linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')"

setup(
    name="flashvit",
    version="0.1.0",
    description="Vision Transformer with fused Triton kernels (patch embed, flash attention, GEMM epilogues, LayerNorm)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["flashvit", "flashvit.kernels", "flashvit.vit", "flashvit.bench"],
    package_dir={
        "flashvit": "flashvit",
        "flashvit.kernels": "kernels",
        "flashvit.vit": "vit",
        "flashvit.bench": "bench",
    },
    package_data={"flashvit.bench": ["*.sh"]},
    install_requires=["torch>=2.4", "numpy", _TRITON],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "timm", "transformers", "ruff"],
        "train": ["tqdm", "matplotlib"],
    },
)
