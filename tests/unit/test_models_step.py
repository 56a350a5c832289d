"""The training step, schedules and fit_local."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from atlas.data.batches import csr_to_batch
from atlas.models import ConcertoConfig, CVQVAEConfig, build_model
from atlas.train.step import cosine_annealing, fit_local, minibatches, polynomial_decay

torch.set_num_threads(1)


def _clustered(n=128, seed=0):
    """Two groups of cells with distinct expressed features."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n)
    lam = np.where(group[:, None] == 0, np.r_[np.full(10, 3.0), np.full(10, 0.2)], np.r_[np.full(10, 0.2), np.full(10, 3.0)])
    rna = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
    atac = sp.csr_matrix(rng.poisson(lam[:, ::-1] * 0.5).astype(np.float32))
    return rna, atac


def test_fit_local_reduces_concerto_loss():
    torch.manual_seed(0)
    rna, _ = _clustered()
    batch = csr_to_batch({"RNA": rna})
    model = build_model(ConcertoConfig(embed_dim=16), {"RNA": 20}, 1)
    mbs = minibatches(batch, 32, seed=0)
    hist = fit_local(model, mbs, epochs=8, lr=1e-2)
    assert hist.epochs[-1]["loss"] < hist.epochs[0]["loss"]
    assert hist.steps[-1]["lr"] < hist.steps[0]["lr"]


def _cvqvae_run(epochs, checkpoint=None, stop_after=None):
    """A small CVQVAE (dropout, EMA codebook, cosine schedule) trained from seed 0; ``stop_after``
    raises out of the loop after that many epochs, as a killed run would stop."""
    torch.manual_seed(0)
    rna, atac = _clustered()
    model = build_model(
        CVQVAEConfig(view_components=6, hidden=(16,), latent_dim=4, codebook_size=8), {"RNA": 20, "ATAC": 20}, 1
    )
    model.fit_views({"RNA": rna, "ATAC": atac})
    batch = csr_to_batch({"RNA": rna, "ATAC": atac})

    def log(epoch, _means):
        if stop_after is not None and epoch + 1 == stop_after:
            raise KeyboardInterrupt

    try:
        hist = fit_local(model, lambda e: minibatches(batch, 32, seed=e), epochs=epochs, lr=1e-2,
                         steps_per_epoch=4, checkpoint=checkpoint, log=log)
    except KeyboardInterrupt:
        return model, None
    return model, hist


def test_fit_local_reduces_cvqvae_loss():
    _, hist = _cvqvae_run(8)
    assert hist.epochs[-1]["loss"] < hist.epochs[0]["loss"]


def test_fit_local_resumed_from_its_checkpoint_equals_an_uninterrupted_run(tmp_path):
    whole, whole_hist = _cvqvae_run(4)
    ckpt = tmp_path / "state.pt"
    _, stopped = _cvqvae_run(4, checkpoint=ckpt, stop_after=2)
    # The log hook runs before the epoch's state is saved: the file holds epoch 1 of 4.
    assert stopped is None and torch.load(ckpt, weights_only=False)["epochs_done"] == 1
    resumed, resumed_hist = _cvqvae_run(4, checkpoint=ckpt)
    assert len(resumed_hist.epochs) == 4 and len(resumed_hist.steps) == 16
    for name, value in whole.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[name].float(), atol=1e-6), name
    assert [e["loss"] for e in resumed_hist.epochs] == [e["loss"] for e in whole_hist.epochs]
    assert [s["lr"] for s in resumed_hist.steps] == [s["lr"] for s in whole_hist.steps]
    assert not (tmp_path / "state.pt.partial").exists()


def test_fit_local_refuses_a_checkpoint_of_other_settings(tmp_path):
    ckpt = tmp_path / "state.pt"
    _cvqvae_run(2, checkpoint=ckpt)
    with pytest.raises(ValueError, match="2 epochs of 4 steps at lr 0.01, not 3 of 4"):
        _cvqvae_run(3, checkpoint=ckpt)


def test_schedules():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    poly = polynomial_decay(opt, 10)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        poly.step()
    assert lrs[0] == 1.0 and abs(lrs[10] - 0.01) < 1e-9 and abs(lrs[11] - 0.01) < 1e-9
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cos = cosine_annealing(opt, 4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        cos.step()
    np.testing.assert_allclose(lrs, [1.0, 0.8535534, 0.5, 0.1464466, 0.0], atol=1e-6)


def test_minibatches_single_domain():
    rna, _ = _clustered(40)
    batch = csr_to_batch({"RNA": rna}, domain=np.arange(40) % 3)
    for mb in minibatches(batch, 5, by_domain=True):
        assert len(torch.unique(mb["domain"])) == 1 and mb["domain"].shape[0] == 5
