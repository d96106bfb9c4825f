"""Installs efficientnet_tpu and its console scripts."""

import os
import re

import setuptools

_HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
  with open(os.path.join(_HERE, 'efficientnet_tpu', '__init__.py')) as f:
    return re.search(r"__version__ = '([^']+)'", f.read()).group(1)


def _requirements(name):
  with open(os.path.join(_HERE, name)) as f:
    return [l.strip() for l in f
            if l.strip() and not l.startswith(('#', '-r'))]


setuptools.setup(
    name='efficientnet_tpu',
    version=_version(),
    description='Large-batch EfficientNet training (LARS, group BN, sharded '
                'eval) on Cloud TPU pods, GPUs and CPUs with TF2 / Keras 3.',
    packages=setuptools.find_packages(exclude=('tests', 'benchmarks')),
    python_requires='>=3.9',
    install_requires=_requirements('requirements.txt'),
    extras_require={
        # tfds makes the (offline) tfds source test run instead of skip.
        'test': ['pytest>=7.0', 'scikit-learn>=1.2',
                 'tensorflow-datasets>=4.9', 'importlib_resources'],
        # tfds needs importlib_resources to prepare datasets defined in code.
        'tfds': ['tensorflow-datasets>=4.9', 'importlib_resources'],
        # Only for legacy TPU Nodes; TPU VMs (--tpu=local) need nothing.
        # Pin protobuf: cloud-tpu-client otherwise downgrades it.
        'tpu_node': ['cloud-tpu-client>=0.10', 'protobuf>=6.31,<8'],
    },
    entry_points={
        'console_scripts': [
            'efficientnet-tpu-train=efficientnet_tpu.main:run',
            'efficientnet-tpu-make-tfrecords='
            'efficientnet_tpu.tools.make_tfrecords:run',
        ],
    },
)
