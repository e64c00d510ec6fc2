r"""The minibatch route to a discrete geodesic (:mod:`manifolds.geodesic.minibatch_relax`).

On a tiny float64 problem (a 4-6-3 tanh network, 40 inputs) every claim has an exact
reference: with all the data in one batch the stochastic route minimises the same energy as
the full-batch :func:`~manifolds.geodesic.relax` and must reach its minimum; the energy of
the final pass is :math:`\sum_i \frac{N_i}{N} E_i`, which must equal the energy of one metric
on all the data whatever the batching.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from manifolds import FlatModule, Status
from manifolds.geodesic import Minibatch, discrete_energy, full_data_energy, relax_minibatches
from riemfip.connectivity import connect, connection_metric, path_energy

DAMPING = 1e-2


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.fixture(scope="module")
def problem():
    a, b = _net(0), _net(1)
    x = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return a, b, x


def test_one_full_batch_reaches_the_energy_of_full_batch_relax(problem):
    a, b, x = problem
    exact = connect(a, b, x, n_points=5, damping=DAMPING, tol=1e-10, maxiter=2000)
    policy = Minibatch(epochs=3000, lr=0.05, check_every=20, patience=3, rtol=1e-7, final_lr=1e-3)
    path = connect(a, b, [x], n_points=5, damping=DAMPING, method=policy)
    e_exact, e_line = exact.metadata["objective"], path.metadata["objective_line"]
    assert e_exact < 0.9 * e_line  # the geodesic is far from the line: the test can fail
    assert path.metadata["objective"] == pytest.approx(e_exact, rel=1e-6)
    assert path.converged and path.status == Status.CONVERGED and path.method == "minibatch"
    assert torch.equal(path.points[0], FlatModule(a).flatten())
    assert torch.equal(path.points[-1], FlatModule(b).flatten())
    # relax's midpoint-rule energy, computed from all the data in one pass: the same number
    assert path.energy == pytest.approx(exact.energy, rel=1e-5)


def test_final_energy_is_the_energy_over_all_the_data_whatever_the_batching(problem):
    a, b, x = problem
    loader = DataLoader(TensorDataset(x), batch_size=7, shuffle=True)  # 5 of 7, one of 5
    policy = Minibatch(epochs=3, check_every=4)
    path = connect(a, b, loader, n_points=4, damping=DAMPING, method=policy)
    full = connection_metric(a, x, damping=DAMPING)
    assert path.metadata["objective"] == pytest.approx(path_energy(full, path), rel=1e-12)
    assert path.metadata["objective_line"] == pytest.approx(
        float(
            discrete_energy(
                full,
                torch.stack(
                    [
                        path.points[0] + s * (path.points[-1] - path.points[0])
                        for s in torch.linspace(0, 1, 4, dtype=torch.float64)
                    ]
                ),
            )
        ),
        rel=1e-12,
    )
    # the midpoint speeds of the streamed pass are |dw|_g with g on all the data
    mids = 0.5 * (path.points[1:] + path.points[:-1])
    speeds = torch.stack(
        [full.norm(m, d) for m, d in zip(mids, path.points.diff(dim=0), strict=True)]
    )
    assert path.length == pytest.approx(float(speeds.sum()), rel=1e-10)
    assert path.metadata["connect"]["anchor_inputs"] == 40


def test_full_data_energy_matches_one_metric_on_a_tensor(problem):
    a, b, x = problem
    w = torch.stack([FlatModule(n).flatten() for n in (a, b, a)])

    def metric_of(batch):
        return connection_metric(a, batch, damping=DAMPING)

    energy, _ = full_data_energy(metric_of, x, w, batch_size=9)
    assert energy == pytest.approx(float(discrete_energy(metric_of(x), w)), rel=1e-12)


def test_the_epoch_cap_gives_max_iterations_with_its_message(problem):
    a, b, x = problem
    path = connect(a, b, x, n_points=4, damping=DAMPING, method=Minibatch(epochs=2, batch_size=16))
    assert path.status == Status.MAX_ITERATIONS and not path.converged
    assert "maximum number of epochs" in path.message
    assert path.iterations == 2 * 3  # 40 inputs in batches of 16: 3 steps per epoch
    with pytest.raises(Exception, match="did not converge"):
        path.raise_if_failed()


def test_a_run_shorter_than_one_check_still_judges_its_last_points(problem):
    a, b, x = problem
    policy = Minibatch(epochs=2, batch_size=16, check_every=25)  # 6 steps, no check on the way
    path = connect(a, b, x, n_points=4, damping=DAMPING, method=policy)
    start, last = path.metadata["held_out_energies"]
    assert last < start  # six Adam steps lowered it, so the moved points come back
    assert path.metadata["objective"] < path.metadata["objective_line"]


def test_a_step_size_that_only_hurts_is_a_breakdown_not_convergence(problem):
    a, b, x = problem
    policy = Minibatch(epochs=200, lr=50.0, check_every=1, patience=2, rtol=0.5, final_lr=0.1)
    path = connect(a, b, [x], n_points=4, damping=DAMPING, method=policy)
    assert path.status in (Status.BREAKDOWN, Status.NON_FINITE)
    line = torch.stack(
        [
            path.points[0] + s * (path.points[-1] - path.points[0])
            for s in torch.linspace(0, 1, 4, dtype=torch.float64)
        ]
    )
    assert torch.equal(path.points, line)  # the starting points come back


def test_held_out_inputs_decide_which_points_come_back(problem):
    a, b, x = problem
    held = torch.randn(30, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    policy = Minibatch(epochs=40, check_every=5, batch_size=10)
    path = connect(a, b, x, n_points=4, damping=DAMPING, method=policy, held_out=held)
    history = path.metadata["held_out_energies"]
    best = path_energy(connection_metric(a, held, damping=DAMPING), path)
    assert best == pytest.approx(min(history), rel=1e-10)


def test_bad_input_gives_named_errors(problem):
    a, b, x = problem
    with pytest.raises(ValueError, match="no batches"):
        connect(a, b, DataLoader(TensorDataset(x[:0]), batch_size=4), method="minibatch")
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="0.weight"):
        connect(a, other, x, method="minibatch")
    with pytest.raises(ValueError, match="held_out"):
        connect(a, b, x, held_out=x)
    with pytest.raises(ValueError, match="check_every"):
        Minibatch(check_every=0)
    with pytest.raises(ValueError, match="lr"):
        Minibatch(lr=-1.0)
    with pytest.raises(TypeError, match="batch 0"):
        relax_minibatches(lambda z: None, x[0], x[0], [["not a tensor"]])


def test_a_run_resumed_from_an_epoch_state_ends_as_the_uninterrupted_one(problem, tmp_path):
    a, b, x = problem
    policy = Minibatch(epochs=4, batch_size=8, check_every=3, patience=2, lr=0.1, seed=5)
    states = []
    whole = connect(a, b, x, n_points=4, damping=DAMPING, method=policy, on_epoch=states.append)
    assert [s["epoch"] for s in states] == [1, 2, 3, 4]  # the cap: no stop inside an epoch
    # through a file, as a checkpoint is read back (weights only)
    torch.save(states[1], tmp_path / "epoch2.pt")
    saved = torch.load(tmp_path / "epoch2.pt", weights_only=True)
    resumed = connect(a, b, x, n_points=4, damping=DAMPING, method=policy, resume=saved)
    assert torch.equal(resumed.points, whole.points)
    assert resumed.iterations == whole.iterations == 4 * 5  # 5 batches of 8 per epoch
    assert resumed.metadata["held_out_energies"] == whole.metadata["held_out_energies"]
    assert resumed.metadata["objective"] == whole.metadata["objective"]
    # the state carries the rest of the run: the interior at epoch 2 is not the final one,
    # and two more epochs from its points alone (a fresh Adam, a fresh shuffle) end elsewhere
    assert not torch.equal(states[1]["interior"], whole.points[1:-1])
    init = torch.cat([whole.points[:1], states[1]["interior"], whole.points[-1:]])
    rest = dataclasses.replace(policy, epochs=2)
    fresh = connect(a, b, x, n_points=4, damping=DAMPING, method=rest, init=init)
    assert not torch.equal(fresh.points, whole.points)
    bad = dict(saved, interior=saved["interior"][:1])
    with pytest.raises(ValueError, match="another problem"):
        connect(a, b, x, n_points=4, damping=DAMPING, method=policy, resume=bad)
