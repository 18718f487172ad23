"""Build and install llama3np.

`pip install -e .`            the runtime (NumPy model, tokenizer, checkpoints, training, C kernels)
`pip install -e '.[test]'`    + pytest, hypothesis and the notebook runner
`pip install -e '.[ref]'`     + PyTorch (CPU build 2.13.0) and transformers, used only as test references
"""
from setuptools import find_packages, setup

install_requires = [
    "numpy>=1.26",
    "cffi>=1.16",  # builds and loads the C kernels in csrc/
    "tiktoken>=0.7",  # the BPE engine behind Llama 3's tokenizer
    "llama-models>=0.3",  # ships Meta's tokenizer.model, our default vocabulary
    "tqdm>=4.66",  # progress bars on long work
    "matplotlib>=3.8",  # loss curves, Gantt charts, attention maps
]

extras_require = {
    "test": [
        "pytest>=8",
        "pytest-timeout>=2.3",  # a hung test fails instead of blocking CI
        "hypothesis>=6.100",
        "nbclient>=0.10",  # executes the notebooks inside the test suite
        "nbformat>=5.10",
        "ipykernel>=6.29",
        "jupytext>=1.16",  # the notebooks' readable .py twins
        "threadpoolctl>=3.1",
    ],
    "ref": [
        "torch==2.13.0",  # the CPU build that lies on these machines; other versions download GBs
        "transformers>=4.45",
        "fairscale",  # Meta's llama_models.llama3.model imports it; we compare with its apply_scaling
    ],
}

setup(
    name="llama3np",
    version="0.1.0",
    description="Llama 3 from scratch in NumPy with a small C extension, forward and hand-written backward",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llama3np", "llama3np.*"]),
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["llama3np = llama3np.cli:main"]},
)
