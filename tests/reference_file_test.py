"""Reading reference checkpoints from files (``reference.load_state_dict_file``).

The ``.pth`` cases need torch (an optional extra) and are skipped without it.
"""

import numpy as np
import pytest

import metaprune_jax as mp
from metaprune_jax.nets import reference


def _state_dict(seed=0):
  arch = mp.get_arch("resnet20", 10, widths={"s1": 8, "s2": 12, "s3": 16,
                                             "layer1.0.conv1": 5})
  rng = np.random.default_rng(seed)
  variables = {"params": {}, "batch_stats": {}}
  for coll, shapes in (("params", arch.param_shapes()), ("batch_stats", arch.stat_shapes())):
    for layer, leaves in shapes.items():
      variables[coll][layer] = {k: rng.standard_normal(s).astype(np.float32)
                                for k, s in leaves.items()}
  return arch, variables, mp.export_reference_state_dict(arch, variables,
                                                         num_batches_tracked=True)


def test_npz_round_trip_bit_for_bit(tmp_path):
  arch, variables, sd = _state_dict()
  path = str(tmp_path / "sd.npz")
  np.savez(path, **sd)
  got = reference.load_state_dict_file(path)
  assert list(got) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(got[k], sd[k])


def test_pth_state_dict_and_pickled_module(tmp_path):
  torch = pytest.importorskip("torch")
  arch, variables, sd = _state_dict(1)
  path = str(tmp_path / "sd.pth")
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
  got = reference.load_state_dict_file(path)
  assert list(got) == list(sd)
  for k in sd:
    assert got[k].dtype == np.asarray(sd[k]).dtype
    np.testing.assert_array_equal(got[k], sd[k])
  arch2, variables2 = mp.import_reference_model(got, "resnet20", 10)
  assert dict(arch2.widths) == dict(arch.widths)
  np.testing.assert_array_equal(np.asarray(variables2["params"]["conv1"]["kernel"]),
                                variables["params"]["conv1"]["kernel"])

  # A whole pickled module (what the reference saves): refused by default, read when trusted.
  module = torch.nn.Sequential(torch.nn.Linear(3, 2))
  mpath = str(tmp_path / "module.pth")
  torch.save(module, mpath)
  with pytest.raises(ValueError, match="not a plain state dict.*trusted=True"):
    reference.load_state_dict_file(mpath)
  got = reference.load_state_dict_file(mpath, trusted=True)
  assert list(got) == ["0.weight", "0.bias"]
  np.testing.assert_array_equal(got["0.weight"], module[0].weight.detach().numpy())

  # Something that is not a state dict.
  opath = str(tmp_path / "list.pth")
  torch.save([torch.zeros(2)], opath)
  with pytest.raises(ValueError, match="not a state dict"):
    reference.load_state_dict_file(opath)
