"""candidate_layers sees timm's own activation classes (GELU, GELUTanh, QuickGELU, Swish, HardSwish, Mish, ...)."""

import pytest
import timm
import torch
from timm.layers import activations, activations_me

from timm_icl.layers import candidate_layers


@pytest.mark.parametrize(
    "act",
    [activations.GELU, activations.GELUTanh, activations.QuickGELU, activations.Swish, activations.HardSwish,
     activations.Mish, activations_me.SwishMe, activations_me.HardSwishMe],
)  # fmt: skip
def test_timm_activation_classes_are_candidates(act):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), act(), torch.nn.Linear(8, 8), act(), torch.nn.Linear(8, 3))
    rows = candidate_layers(model, input_size=(4,))
    assert [r["layer"] for r in rows] == ["1:input", "3:input"] and [r["units"] for r in rows] == [8, 8]


def test_convnext_lists_every_block():
    model = timm.create_model("convnext_atto")  # depths 2, 2, 6, 2; timm's GELU in every block's MLP
    names = [r["layer"] for r in candidate_layers(model, input_size=(3, 64, 64))]
    assert sum(name.endswith("mlp.fc1") for name in names) == 12


def test_every_activation_timm_can_create_is_recognised():
    # timm's create_act_layer tables (torch's classes where torch has them, timm's own otherwise); Identity is not
    from timm.layers import create_act

    from timm_icl.layers import _ACTIVATIONS

    tables = [create_act._ACT_LAYER_DEFAULT, create_act._ACT_LAYER_ME]
    classes = {cls for table in tables for cls in table.values() if cls is not torch.nn.Identity}
    assert classes and all(issubclass(cls, _ACTIVATIONS) for cls in classes)
    assert not issubclass(torch.nn.Identity, _ACTIVATIONS)
