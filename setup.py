import re

from setuptools import find_packages, setup

# the one version string lives in the package; read it without importing the package (and torch)
VERSION = re.search(r'^__version__ = "([^"]+)"', open("pahubert_plugin/__init__.py").read(), re.M).group(1)

setup(
    name="pahubert",
    version=VERSION,
    description="Pac-HuBERT: self-supervised source separation (music, speech in noise, any sources) as a fairseq plugin",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pahubert_plugin", "pahubert_plugin.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch==2.11.0",
        "torchaudio==2.11.0",
        'fairseq-fixed==0.12.3.1; python_version>="3.11"',
        'fairseq>=0.12.2; python_version<"3.11"',
        "numpy==2.2.6",
        "npy-append-array==0.9.19",
        "scikit-learn==1.7.2",
        "joblib==1.5.2",
        "soundfile==0.13.1",
        "musdb==0.4.2",
        "museval==0.4.1",
        "tqdm==4.67.1",
        "matplotlib==3.10.7",
        "scipy==1.17.1",
        "mido==1.3.3",
        "tensorboardX==2.6.5",  # fairseq's common.tensorboard_logdir (and no "Please install" line)
        "safetensors==0.8.0",  # pahubert-port-hubert reads transformers folders
        "pesq==0.0.4",  # pahubert-evaluate --metrics pesq (wide band)
        "pystoi==0.4.1",  # pahubert-evaluate --metrics stoi
        "pyroomacoustics==0.10.1",  # pahubert-speech-corpus --reverb
    ],
    extras_require={
        "test": ["pytest==8.4.2", "pytest-xdist==3.8.0", "transformers==5.24.0"],
        "bench": ["openunmix==1.3.0", "demucs==4.0.1"],
    },
    entry_points={
        "console_scripts": [
            "pahubert-manifest = pahubert_plugin.data.manifest:main",
            "pahubert-dump-features = pahubert_plugin.clustering.dump_features:main",
            "pahubert-check-labels = pahubert_plugin.clustering.check_labels:main",
            "pahubert-label-quality = pahubert_plugin.clustering.label_quality:main",
            "pahubert-toy-corpus = pahubert_plugin.corpora.toy:main",
            "pahubert-midi-corpus = pahubert_plugin.corpora.midi:main",
            "pahubert-speech-corpus = pahubert_plugin.corpora.speech_noise:main",
            "pahubert-evaluate = pahubert_plugin.evaluate:main",
            "pahubert-separate = pahubert_plugin.separate:main",
            "pahubert-port-hubert = pahubert_plugin.port_hubert:main",
            "pahubert-plot-log = pahubert_plugin.plot_log:main",
        ],
    },
)
