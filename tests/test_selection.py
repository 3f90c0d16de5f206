import pytest
from torch import nn

from lightning_norm import LayerSelection, SelectionError
from lightning_norm.layers.base import NormLayer
from lightning_norm.selection import is_norm_layer


class Wrapped(NormLayer):
    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(x)


def net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        Wrapped(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def test_default_selects_outermost_norm_layers():
    names = [n for n, _ in LayerSelection().resolve(net())]
    assert names == ["1", "4"]  # the wrapper's inner BatchNorm is not a second layer


def test_outermost_false_keeps_nested():
    names = [n for n, _ in LayerSelection(outermost=False).resolve(net())]
    assert names == ["1", "4", "4.bn"]


def test_default_falls_back_to_weight_layers():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert [n for n, _ in LayerSelection().resolve(model)] == ["0", "2"]


def test_types_include_exclude():
    sel = LayerSelection(types=(nn.Conv2d, nn.Linear), include=["0", "7"], exclude="7")
    assert [n for n, _ in sel.resolve(net())] == ["0"]
    pred = LayerSelection(types=nn.Conv2d, include=lambda n, m: m.out_channels == 4)
    assert [n for n, _ in pred.resolve(net())] == ["0", "3"]


def test_shared_module_listed_once():
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(3, 3), bn, nn.Linear(3, 3), bn)
    assert [n for n, _ in LayerSelection().resolve(model)] == ["1"]


def test_root_norm_layer_is_selected():
    assert [n for n, _ in LayerSelection().resolve(nn.BatchNorm1d(2))] == [""]


def test_glob_matching_nothing_names_candidates():
    with pytest.raises(SelectionError, match=r"matches none .*1, 4"):
        LayerSelection(include="features.*").resolve(net())


def test_exclude_everything_raises():
    with pytest.raises(SelectionError, match="removes every candidate"):
        LayerSelection(exclude="*").resolve(net())


def test_missing_type_lists_types_present():
    with pytest.raises(SelectionError, match="Conv2d"):
        LayerSelection(types=nn.LSTM).resolve(net())


@pytest.mark.parametrize("bad", [(int,), ("Conv2d",), ()])
def test_bad_types_raise_at_construction(bad):
    with pytest.raises(SelectionError, match=r"nn\.Module subclasses"):
        LayerSelection(types=bad)


def test_bad_filter_raises_at_construction():
    with pytest.raises(SelectionError, match="glob"):
        LayerSelection(include=[1, 2])


def test_is_norm_layer():
    assert is_norm_layer(nn.GroupNorm(2, 4)) and is_norm_layer(Wrapped(2))
    assert not is_norm_layer(nn.Conv2d(1, 1, 1))
