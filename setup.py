"""Build of relex_kernels: the Python package plus the optional native extension(s)."""

from setuptools import find_packages, setup

setup(
    name="relex_kernels",
    version="0.1.0",
    description="Streaming RELEX extrapolation of RLVR checkpoints with fused CPU/GPU kernels",
    packages=find_packages(include=["relex_kernels", "relex_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["numpy>=1.24", "tqdm>=4.60"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark", "hypothesis", "safetensors", "torch", "transformers"],
    },
    entry_points={"console_scripts": ["relex=relex_kernels.cli:main"]},
)
