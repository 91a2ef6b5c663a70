"""The cross-fitted gate (``model.head_gate: crossfit``): detached from the cls output, fit on out-of-fold errors."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file
from train_helpers import make_cached_run, train_settings

from roadwork_cli.io.atomic import read_json
from roadwork_cli.metrics.selective import aurc
from roadwork_cli.model.head import SelectiveHead
from roadwork_cli.training.api import train
from roadwork_cli.training.artifacts import load_best_head
from roadwork_cli.training.cached import fit_crossfit_gate


def test_crossfit_head_round_trips_and_its_gate_reads_the_cls_logit():
    head = SelectiveHead(8, hidden=4, dropout=0.0, gate="crossfit")
    assert SelectiveHead.from_config(head.config).gate == "crossfit"
    assert SelectiveHead(8, hidden=4).config["gate"] == "shared"
    x = torch.randn(5, 8)
    out = head(x)
    expected = head.crossfit_gate(head.hidden_features(x), out.cls)
    torch.testing.assert_close(out.gate, expected)
    with torch.no_grad():
        head.gate_out.weight.zero_()
        head.gate_out.weight[0, -2] = 1.0  # gate = cls logit
        head.gate_out.bias.zero_()
    out = head(x)
    torch.testing.assert_close(out.gate, out.cls)


def test_no_gate_loss_reaches_the_trunk_or_the_cls_output():
    head = SelectiveHead(8, hidden=4, dropout=0.0, gate="crossfit")
    head(torch.randn(16, 8)).gate.sum().backward()
    assert head.gate_out.weight.grad.abs().sum() > 0
    others = [p.grad for name, p in head.named_parameters() if not name.startswith("gate_out")]
    assert all(g is None or not g.any() for g in others)


def test_the_fitted_gate_beats_the_softmax_response_where_errors_are_flagged_by_a_feature():
    # Errors concentrate where hidden feature 0 is high (a region whose labels are noisy), independent of the margin:
    # the softmax response cannot see that, a gate fit on those errors can.
    generator = torch.Generator().manual_seed(0)
    n = 4000
    hidden_flag = torch.rand(n, generator=generator) < 0.2
    labels = (torch.rand(n, generator=generator) < 0.5).float()
    logits = (2 * labels - 1) * (0.5 + 2 * torch.rand(n, generator=generator))  # right, with varying margins
    flip = hidden_flag & (torch.rand(n, generator=generator) < 0.4)
    labels = torch.where(flip, 1 - labels, labels)
    features = torch.randn(n, 6, generator=generator)
    features[:, 0] = hidden_flag.float() * 3 + 0.1 * torch.randn(n, generator=generator)
    head = SelectiveHead(6, hidden=0, dropout=0.0, gate="crossfit")  # hidden features = LayerNorm(features)
    train_half, test = slice(0, n // 2), slice(n // 2, n)
    fit_crossfit_gate(head, features[train_half], logits[train_half], labels[train_half], alpha=0.02, seed=0)
    with torch.no_grad():
        gate = head.crossfit_gate(head.hidden_features(features[test]), logits[test]).numpy()
    # Errors of the decision at the operating threshold the gate was fit for (2 % of roadwork below it).
    tau = torch.quantile(logits[train_half][labels[train_half] == 1], 0.02)
    errors = ((logits[test] >= tau).float() != labels[test]).numpy().astype(float)
    softmax_response = np.abs(torch.sigmoid(logits[test]).numpy() - 0.5)
    assert aurc(gate, errors) < 0.85 * aurc(softmax_response, errors)


def test_training_with_a_crossfit_gate_fits_it_after_training_and_repeats_exactly(tmp_path):
    run = make_cached_run(tmp_path / "run")
    settings = train_settings(run, epochs=3, gate_folds=3, cls_fit="sgd")  # the SGD cls: its own out-of-fold heads
    settings.model.head_gate = "crossfit"
    selected: dict[int, dict[str, torch.Tensor]] = {}  # best.safetensors as each epoch that was selected wrote it

    def keep_selected(epoch, _metrics):
        if read_json(run.checkpoints / "best.json")["epoch"] == epoch:
            selected[epoch] = load_file(run.checkpoints / "best.safetensors")

    train(run, settings, on_epoch_end=keep_selected)
    info = read_json(run.checkpoints / "best.json")
    assert info["gate"] == "crossfit over 3 folds" and info["head"]["gate"] == "crossfit"
    first = run.checkpoints.joinpath("best.safetensors").read_bytes()
    head, _ = load_best_head(run)
    assert head.gate == "crossfit"
    # A re-run (as after SIGKILL once the epochs are done) refits the gate from the same seed: identical bytes.
    assert train(run, settings).resumed_from == 3
    assert run.checkpoints.joinpath("best.safetensors").read_bytes() == first
    # The head is that of the selected epoch: the gate stage changed gate_out only.
    best, at_selection = load_file(run.checkpoints / "best.safetensors"), selected[info["epoch"]]
    assert set(best) == set(at_selection)
    assert all(torch.equal(best[k], at_selection[k]) for k in best if not k.startswith("gate_out."))
    assert any(not torch.equal(best[k], at_selection[k]) for k in best if k.startswith("gate_out."))
