"""crate_jax: CRATE, the white-box transformer, in JAX/Flax."""
import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent
requirements = [line.strip() for line in (here / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

# torch==2.13.0 is the CPU build on Python 3.11; the GPU images already ship their own torch.
TORCH = ["torch==2.13.0"]
# libtpu for jax 0.10.2 (jax[tpu]==0.10.2 adds only libtpu 0.0.42.*, ~210 MB): the TPU runtime, and
# the compiler `python -m crate_jax.plan` uses to compile for a TPU slice on a CPU-only machine.
# The TPU images (jax 0.11.x) already ship their jax[tpu]: do not add this extra there.
TPU = ["jax[tpu]==0.10.2"]
# benchmarks/input_pipeline.py: scikit-image ships the photographs its JPEG set is made from. The
# torchvision side runs in a venv of its own (--torchvision-python): no torchvision release imports
# beside the CPU torch 2.13.0 here (PyPI's 0.28.0 is a CUDA build: "operator torchvision::nms does
# not exist"), while torch 2.14.1 + torchvision 0.29.1 do, together (docs/benchmarks.md).
BENCH = ["scikit-image>=0.26"]

setup(
    name="crate_jax",
    version="0.1.0",
    description="CRATE (Coding RAte reduction TransformEr) in JAX/Flax: train, fine-tune, inspect.",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["crate_jax", "crate_jax.*"]),
    install_requires=requirements,
    extras_require={
        "torch": TORCH,
        "tpu": TPU,
        "bench": BENCH,
        # scikit-image: the input benchmark's smoke test (tests/test_input_bench.py) builds its
        # JPEGs from the sample photographs it ships.
        "test": TORCH + ["pytest>=8", "pytest-xdist>=3.5", "scikit-learn>=1.4", "ruff>=0.17,<0.18",
                         "pyyaml>=6", "scikit-image>=0.26"],
    },
    license="Apache-2.0",
)
