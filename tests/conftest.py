import pytest

from tdpsim.costs import CostModel
from tdpsim.host.host import Host, HostConfig
from tdpsim.sim.strategy import make_strategy


@pytest.fixture
def mkhost():
    """Host factory: ``mkhost(ncpus=2, costs={...}, **config)``."""
    def make(costs=None, strategy="fifo", seed=0, granularity="exact", trace=None, **cfg):
        return Host(HostConfig(**cfg), CostModel(costs or {"context_switch": 1}),
                    make_strategy(strategy, seed), granularity, trace)
    return make
