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


# TensorFlow is an extra: which build a machine needs depends on its hardware,
# and pip extras only add packages. Without an extra, pip keeps the
# TensorFlow a machine already has (a TPU VM runtime, an NGC container,
# conda). `cpu`: tensorflow-cpu on x86-64 (the full
# wheel elsewhere); `gpu`: tensorflow with the CUDA libraries from pip. TPU VM
# runtimes ship their own TensorFlow, so they install no extra.
_TF_CPU = ['tensorflow-cpu>=2.18; platform_machine == "x86_64"',
           'tensorflow>=2.18; platform_machine != "x86_64"']

setuptools.setup(
    name='efficientnet_tpu',
    version=_version(),
    description='Large-batch EfficientNet training (LARS, group BN, sharded '
                'eval) on Cloud TPU pods, GPUs and CPUs with TF2 / Keras 3.',
    license='Apache-2.0',
    packages=setuptools.find_packages(exclude=('tests', 'tests.*',
                                               'benchmarks', 'benchmarks.*')),
    # The presets (absl flagfiles) load by name: --preset=NAME.
    package_data={'efficientnet_tpu.presets': ['*.cfg']},
    # The support matrix (efficientnet_tpu/stack.py, checked at start-up):
    # Python >= 3.10 (Cloud TPU VM images), TensorFlow >= 2.18 (from an
    # extra or the machine's own), Keras >= 3.10 (requirements.txt).
    python_requires='>=3.10',
    install_requires=_requirements('requirements.txt'),
    extras_require={
        'cpu': _TF_CPU,
        'gpu': ['tensorflow[and-cuda]>=2.18'],
        # tfds makes the (offline) tfds source test run instead of skip.
        # pytest-xdist: the README's test command runs the modules on 2
        # processes (most of a test is single-threaded Python tracing).
        'test': _TF_CPU + ['pytest>=7.0', 'pytest-xdist>=3.0',
                           'scikit-learn>=1.2', 'tensorflow-datasets>=4.9',
                           'importlib_resources'],
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
            'efficientnet-tpu-report=efficientnet_tpu.tools.report:run',
        ],
    },
)
