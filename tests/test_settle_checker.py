"""The settle checker (``TDPSIM_CHECK_SETTLE=1``): an access to a resource that a pending
fast-mode bulk depends on, without settling it first, raises at once.

The differential tests run under it (``settle_checker`` fixture); these tests prove that
it fires: each removes one settle from the code and checks that a run that reaches it
raises ``SettleError`` naming the resource, and that the same run passes with the settle in
place."""

import pytest

from tdpsim.host.locks import RwLock
from tdpsim.kvm.vcpu import TouchGuest
from tdpsim.mmu.page import ShadowPage
from tdpsim.sim.engine import Bulk, Engine, Resource, SettleError
from tdpsim.workloads.vm import VmHarness

pytestmark = pytest.mark.usefixtures("settle_checker")


def test_assert_settled_fires_only_while_a_bulk_of_another_task_is_pending():
    eng = Engine(granularity="fast")
    assert eng.check_settle
    table = Resource()
    seen = []

    def looper():
        done = 0
        while done < 100:
            done += yield Bulk((100 - done, 10), lambda k: None, [(table, 0, 100, 40, 50)])

    def reader():
        yield 105
        eng.assert_settled(table, 0, 10, True)        # reads keys the bulk never writes
        with pytest.raises(SettleError, match="read of .* by reader .* bulk of looper"):
            eng.assert_settled(table, 45, 46, True)   # a key the bulk writes
        with pytest.raises(SettleError):
            eng.assert_settled(table, 0, 10, False)   # a write of what it reads
        eng.settle(table, 45, 46, read=True)
        eng.assert_settled(table, 0, 100, False)      # nothing pending any more
        seen.append(True)

    eng.spawn(looper(), "looper")
    eng.spawn(reader(), "reader")
    eng.run()
    assert seen == [True]


def _populate_and_zap():
    """Two vCPUs populate one 2 MiB region each half; a third thread takes mmu_lock for
    write and zaps the region while their populate bulks are pending on it."""
    h = VmHarness(ncpus=3, nvcpus=2, pages=1024, nslots=1, granularity="fast")
    g0 = h.slot_gfn(1)

    def vcpu(th, v, start):
        yield from v.run(th, TouchGuest(start, 512))

    for i, v in enumerate(h.vcpus):
        h.spawn_vcpu(v, vcpu, g0 + i * 512)

    def zapper(th):
        yield 20_000                      # the vCPUs are in the middle of their bulks
        yield from h.arch.kvm_zap_gfn_range(th, g0, g0 + 1024)

    h.spawn(zapper, "zapper")
    h.run()
    return h


def test_the_unmodified_run_passes():
    h = _populate_and_zap()
    assert h.findings == [] and h.kvm.stat["remote_tlb_flush_requests"] >= 1


def _drop_settles_of(monkeypatch, kind):
    real = Engine.settle

    def settle(self, resource, lo=None, hi=None, read=False):
        if not isinstance(resource, kind):
            real(self, resource, lo, hi, read)
    monkeypatch.setattr(Engine, "settle", settle)


def test_a_missing_settle_of_mmu_lock_raises(monkeypatch):
    """Without RwLock.write_lock's settle, the zapper takes mmu_lock for write while the
    vCPUs' populate bulks (which take it for read at every fault) are pending."""
    _drop_settles_of(monkeypatch, RwLock)
    with pytest.raises(SettleError, match=r"write of <tdpsim.host.locks.RwLock.* by zapper"):
        _populate_and_zap()


def test_a_missing_settle_of_a_page_table_raises(monkeypatch):
    """Without the store's settles, the zap walk reads entries the bulks are installing."""
    _drop_settles_of(monkeypatch, ShadowPage)
    monkeypatch.setattr(RwLock, "write_lock", _write_lock_without_settle)
    with pytest.raises(SettleError, match=r"of <sp#\d+ L[12] .* by zapper"):
        _populate_and_zap()


def _write_lock_without_settle(self, th):
    """RwLock.write_lock minus its settle and check: the lock no longer cuts the bulks, so
    the first access to the tables they write is the store's."""
    if self.writer is None and not self.readers and not self.queue:
        self._grant(th, "write")
        return
    yield from self._wait(th, "write")
