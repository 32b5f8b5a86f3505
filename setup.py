"""baryir-plugin: BaryIR all-in-one image restoration as a plugin for BasicSR.

basicsr 1.4.2 is an sdist whose setup_requires pulls a whole second torch into pip's build isolation;
install it with ``--no-build-isolation`` after torch (scripts/install.sh does the whole sequence).
"""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
version = {}
with open(os.path.join(here, 'baryir_plugin', 'version.py')) as f:
    exec(f.read(), version)
with open(os.path.join(here, 'README.md'), encoding='utf-8') as f:
    long_description = f.read()

setup(
    name='baryir-plugin',
    version=version['__version__'],
    description='BaryIR (all-in-one image restoration in a Wasserstein-barycenter latent space) for BasicSR',
    long_description=long_description,
    long_description_content_type='text/markdown',
    license='MIT',
    python_requires='>=3.9',
    packages=find_packages(include=['baryir_plugin', 'baryir_plugin.*']),
    install_requires=[
        'basicsr==1.4.2',
        'torch>=2.1',
        'torchvision',
        'mmengine',
        'lmdb',
        'opencv-python',
        'einops',
        'pyyaml',
        'numpy',
        'tqdm',    # baryir infer's progress bars
        'Pillow',  # baryir infer: the EXIF orientation of photos
    ],
    extras_require={
        'figures': ['matplotlib', 'scikit-learn'],        # baryir figures (plots, t-SNE, silhouette scores)
        'export': ['onnx', 'onnxruntime', 'safetensors'],  # baryir export-onnx (and its parity check), -safetensors
        # pypiqe: reference PIQE for tests/test_metrics_quality.py
        'test': ['pytest', 'pypiqe', 'matplotlib', 'scikit-learn', 'onnx', 'onnxruntime', 'safetensors'],
    },
    entry_points={
        'console_scripts': [
            'baryir = baryir_plugin.cli:main',
            'basicsr = baryir_plugin.cli:basicsr_main',
        ],
        'basicsr.plugins': ['baryir = baryir_plugin'],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'License :: OSI Approved :: MIT License',
        'Topic :: Scientific/Engineering :: Image Processing',
    ],
)
