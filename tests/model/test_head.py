"""SelectiveHead: shapes, config round trip, compile fallback."""

from __future__ import annotations

import copy

import pytest
import torch

from roadwork_cli.config import ModelSettings
from roadwork_cli.errors import UnknownNameError, UsageError
from roadwork_cli.model import head as head_module
from roadwork_cli.model.head import HeadOutput, SelectiveHead, create_head


@pytest.mark.parametrize("hidden", [0, 16])
def test_three_one_logit_outputs(hidden):
    head = SelectiveHead(in_dim=24, hidden=hidden, dropout=0.0)
    out = head(torch.randn(5, 24))
    assert isinstance(out, HeadOutput)
    assert [tuple(t.shape) for t in out] == [(5,), (5,), (5,)]
    # The outputs are distinct heads, not copies of one logit.
    assert not torch.allclose(out.cls, out.gate) and not torch.allclose(out.cls, out.aux)
    linear_layers = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear_layers) == (2 if hidden else 1)


def test_config_round_trip_reproduces_the_head():
    torch.manual_seed(0)
    head = create_head(ModelSettings(head_hidden=8, head_dropout=0.2), in_dim=12).eval()
    clone = SelectiveHead.from_config(head.config).eval()
    clone.load_state_dict(head.state_dict())
    x = torch.randn(3, 12)
    for a, b in zip(head(x), clone(x), strict=True):
        torch.testing.assert_close(a, b)
    assert head.config == {
        "type": "SelectiveHead",
        "in_dim": 12,
        "hidden": 8,
        "dropout": 0.2,
        "standardize": False,
        "gate": "shared",
        "cls": "shared",
    }
    crossfit = create_head(ModelSettings(head_standardize=True, head_gate="crossfit"), in_dim=12)
    assert SelectiveHead.from_config(crossfit.config).config == crossfit.config


def test_a_config_without_every_key_is_refused_with_a_reason():
    with pytest.raises(UsageError, match="lacks standardize, gate, cls.*re-run `roadwork train`"):
        SelectiveHead.from_config({"type": "SelectiveHead", "in_dim": 12, "hidden": 8, "dropout": 0.2})
    config = create_head(ModelSettings(), in_dim=4).config
    with pytest.raises(UnknownNameError, match="Unknown head gate kind 'shraed'; choose one of: shared, crossfit"):
        SelectiveHead.from_config(dict(config, gate="shraed"))
    with pytest.raises(UnknownNameError, match="Unknown head cls kind 'logistic'"):
        SelectiveHead.from_config(dict(config, cls="logistic"))


def test_dropout_only_in_training_mode():
    head = SelectiveHead(in_dim=8, hidden=32, dropout=0.5)
    x = torch.randn(64, 8)
    head.eval()
    torch.testing.assert_close(head(x).cls, head(x).cls)
    head.train()
    assert not torch.allclose(head(x).cls, head(x).cls)


def test_failing_compiled_forward_falls_back_to_eager_with_a_warning(monkeypatch):
    head = SelectiveHead(in_dim=8, hidden=4).eval()
    x = torch.randn(2, 8)
    expected = head(x)

    def broken(_head, _features):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(head_module, "_compiled_logits", lambda: broken)
    assert head.enable_compile()
    with pytest.warns(UserWarning, match="running eagerly"):
        got = head(x)
    torch.testing.assert_close(got.cls, expected.cls)
    assert head.compiled is False
    assert "compiled" not in "".join(head.state_dict())  # checkpoints stay plain


def test_compile_is_off_by_default():
    assert create_head(ModelSettings(), in_dim=4).compiled is False


def _binding_compile(function, dynamic=None):
    """Stands in for torch.compile where no C compiler is present: returns a wrapper bound to what it was given,
    which reproduces the old bug (a compiled bound method keeps its original ``self``)."""

    def compiled(*args):
        return function(*args)

    return compiled


@pytest.mark.parametrize("real_compile", [True, False], ids=["torch.compile", "binding-fake"])
def test_deep_copy_of_a_compiled_head_runs_its_own_weights(monkeypatch, real_compile):
    """The EMA deep-copies the head: the copy's output must follow the copy's weights, not the original's."""
    if not real_compile:
        monkeypatch.setattr(torch, "compile", _binding_compile)
    monkeypatch.setattr(head_module, "_COMPILED", [])
    torch.manual_seed(0)
    head = SelectiveHead(in_dim=8, hidden=4, dropout=0.0).eval()
    assert head.enable_compile()
    x = torch.randn(5, 8)
    original = head(x).cls.clone()
    clone = copy.deepcopy(head)
    with torch.no_grad():
        for parameter in clone.parameters():
            parameter.mul_(-2.0)
    eager = SelectiveHead.from_config(clone.config).eval()
    eager.load_state_dict(clone.state_dict())
    torch.testing.assert_close(clone(x).cls, eager(x).cls)
    assert not torch.allclose(clone(x).cls, original)
    torch.testing.assert_close(head(x).cls, original)  # and the original still runs its own weights
