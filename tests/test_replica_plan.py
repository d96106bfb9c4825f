"""The replica plan: resolved once per run, then handed down."""

import json

import pytest

from efficientnet_tpu import experiment
from efficientnet_tpu import replica_plan
from tests.helpers import small_config


def test_a_train_and_eval_run_resolves_its_plan_once(tmp_path, monkeypatch):
  made = []
  make = replica_plan.make
  monkeypatch.setattr(replica_plan, 'make',
                      lambda *args: made.append(args) or make(*args))
  cfg = small_config(tmp_path, num_replicas=2,
                     model=dict(bn_group_size=2),
                     train=dict(mode='train_and_eval', train_steps=2,
                                iterations_per_loop=2))
  experiment.run_experiment(cfg)
  assert len(made) == 1
  # What the run used and recorded is that plan: 32 images on 2 replicas,
  # one BN group of both.
  resolved = json.loads((tmp_path / 'config.json').read_text())['resolved']
  assert (resolved['per_replica_train_batch'], resolved['bn_group_size'],
          resolved['bn_groups'], resolved['bn_group_batch']) == (16, 2, 1, 32)


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_the_plan_is_frozen_and_says_what_applies(tmp_path, mode):
  cfg = small_config(tmp_path, train=dict(mode=mode, train_batch_size=64,
                                          eval_batch_size=32))
  plan = replica_plan.make(cfg, 4)
  with pytest.raises(AttributeError):
    plan.bn_group_size = 2  # pytype: disable=not-writable
  got = plan.as_dict()
  assert got['per_replica_eval_batch'] == 32 // 4
  if mode == 'train':
    assert got['per_replica_train_batch'] == 64 // 4
    assert got['bn_group_size'] * got['bn_groups'] == 4
  else:  # Inference uses the moving statistics: no train batch or groups.
    assert 'per_replica_train_batch' not in got and 'bn_groups' not in got
    assert got['bn_group_size'] == 1
