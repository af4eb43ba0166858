import pytest

from tdpsim.costs import CostModel
from tdpsim.host.host import Host, HostConfig
from tdpsim.sim.strategy import make_strategy


@pytest.fixture
def settle_checker(monkeypatch):
    """Runs the test under the settle checker (engine.py): an access to a resource that a
    pending bulk depends on, without settling it first, raises ``SettleError``."""
    monkeypatch.setenv("TDPSIM_CHECK_SETTLE", "1")


@pytest.fixture
def mkhost():
    """Host factory: ``mkhost(ncpus=2, costs={...}, **config)``."""
    def make(costs=None, strategy="fifo", seed=0, granularity="exact", trace=None, **cfg):
        return Host(HostConfig(**cfg), CostModel(costs or {"context_switch": 1}),
                    make_strategy(strategy, seed), granularity, trace)
    return make
