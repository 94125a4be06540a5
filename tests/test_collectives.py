"""collective_in_place: one collective over many tensors, results written back slice by slice."""

import torch

from blade.collectives import collective_in_place


def test_each_tensor_gets_its_own_slice_back_in_its_own_dtype():
    a = torch.arange(6, dtype=torch.float32).view(2, 3)
    b = torch.tensor([10.0, 20.0], dtype=torch.bfloat16)
    seen = {}

    def collective(flat):
        seen["flat"] = flat.clone()
        return flat * 2 + 1

    collective_in_place([a, b], collective, dtype=torch.float64)
    assert seen["flat"].dtype == torch.float64
    assert seen["flat"].tolist() == [0, 1, 2, 3, 4, 5, 10, 20]
    assert a.dtype == torch.float32 and a.tolist() == [[1, 3, 5], [7, 9, 11]]
    assert b.dtype == torch.bfloat16 and b.tolist() == [21.0, 41.0]


def test_parameters_are_updated_without_autograd_complaints():
    p = torch.nn.Parameter(torch.zeros(3))
    collective_in_place([p], lambda flat: flat + 5)
    assert p.requires_grad and p.tolist() == [5.0, 5.0, 5.0]
