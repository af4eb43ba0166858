"""Process address space and mmu_notifier hook ordering (mm/mmap.c, madvise.c, ksm.c, rmap.c)."""

import numpy as np
import pytest

from tdpsim.host.memory import ALLOCATED, FREE
from tdpsim.host.mm import PAGE, MmuNotifierOps

COSTS = {"context_switch": 1, "notifier_call": 10, "host_pte_zap": 3}


class Rec(MmuNotifierOps):
    """Logs (hook, time, notifier_count, info); info for ranges: which host PTEs are present."""

    def __init__(self, host, mm, block=0, young=(), name="rec"):
        self.host, self.mm, self.block, self.young, self.name = host, mm, block, set(young), name
        self.log = []
        self.states = {}            # hook -> allocator state snapshot at call time

    def _rec(self, hook, info=None):
        self.log.append((hook, self.host.engine.now, self.mm.notifier_count, info))
        self.states[hook] = self.host.memory.states_of(np.arange(4096))

    def present(self, start, end):
        return [self.mm.lookup(a) is not None for a in range(start, end, PAGE)]

    def hooks(self):
        return [e[0] for e in self.log]

    def invalidate_range_start(self, th, rng):
        self._rec("start", (rng.event, self.present(rng.start, rng.end)))
        if self.block:
            yield self.block

    def invalidate_range_end(self, th, rng):
        self._rec("end", (rng.event, self.present(rng.start, rng.end)))
        return
        yield

    def change_pte(self, th, address, pfn, gen, writable):
        self._rec("change_pte", (address, pfn, gen, writable, self.mm.lookup(address)))
        return
        yield

    def clear_flush_young(self, th, start, end):
        self._rec("clear_flush_young", (start, end))
        return start in self.young
        yield

    def clear_young(self, th, start, end):
        self._rec("clear_young", (start, end))
        return start in self.young
        yield

    def test_young(self, th, address):
        self._rec("test_young", address)
        return address in self.young
        yield

    def release(self, th):
        self._rec("release", self.present(*self.span))
        if self.block:
            yield self.block


def run(host, body):
    out = {}

    def main(th):
        out["ret"] = yield from body(th)
        out["t"] = host.engine.now

    host.spawn(main, "main")
    host.run()
    return out


@pytest.fixture
def host(mkhost):
    return mkhost(costs=COSTS)


def setup(host, npages=4, memfd=False, **kw):
    mm = host.mm()
    fd = mm.memfd_create(npages) if memfd else None
    hva = mm.mmap(npages, fd)
    mm.prefault(hva, npages)
    rec = Rec(host, mm, **kw)
    rec.span = (hva, hva + npages * PAGE)
    mm.register_notifier(rec)
    return mm, hva, rec


def test_munmap_brackets_zap_and_frees_anon_after_end(host):
    mm, hva, rec = setup(host)
    rec2 = Rec(host, mm, name="second")
    mm.register_notifier(rec2)
    pfns = [mm.lookup(hva + i * PAGE)[0] for i in range(4)]
    run(host, lambda th: mm.munmap(th, hva, 4))
    for r in (rec, rec2):
        assert r.hooks() == ["start", "end"]
        (_, _, c1, s), (_, _, c2, e) = r.log
        assert (c1, c2) == (1, 1)
        assert s == ("unmap", [True] * 4) and e == ("unmap", [False] * 4)
        assert (r.states["end"][pfns] == ALLOCATED).all()       # not freed before end
    assert rec.log[0][1] < rec2.log[0][1] < rec.log[1][1] < rec2.log[1][1]
    assert mm.notifier_count == 0
    assert (host.memory.states_of(pfns) == FREE).all() and host.memory.allocated == 0
    assert mm.find_vma(hva) is None


def test_dontneed_and_munmap_keep_memfd_pages_free_anon(host):
    mm, shared, rec = setup(host, memfd=True)
    anon = mm.mmap(4)
    mm.prefault(anon, 4)
    fd = mm.memfds[0]
    fd_refs = [mm.lookup(shared + i * PAGE) for i in range(4)]
    anon_refs = [mm.lookup(anon + i * PAGE) for i in range(4)]
    mem = host.memory

    def body(th):
        yield from mm.madvise_dontneed(th, shared, 4)
        yield from mm.madvise_dontneed(th, anon, 4)

    run(host, body)
    assert [e[3][0] for e in rec.log] == ["clear"] * 4
    assert all(mm.lookup(shared + i * PAGE) is None for i in range(4))
    assert all(mem.is_live(p, g) and mem.owner_of(p) == fd.name for p, g in fd_refs)
    assert not any(mem.is_live(p, g) for p, g in anon_refs)
    assert mm.fault(shared + PAGE) == fd_refs[1]           # same page back from the file
    assert mm.fault(anon + PAGE) != anon_refs[1]           # a fresh anonymous page
    run(host, lambda th: mm.munmap(th, shared, 4))
    assert all(mem.is_live(p, g) for p, g in fd_refs)
    assert [fd.pfn_of(i) for i in range(fd.npages)] == [p for p, _ in fd_refs]


def test_ksm_merge_order(host):
    mm, hva, rec = setup(host, npages=2)
    mem = host.memory
    old = mm.lookup(hva)
    out = run(host, lambda th: mm.ksm_merge(th, hva))
    ksm = out["ret"]
    gen = mem.gen_of(ksm)
    assert rec.hooks() == ["start", "change_pte", "end"]
    assert rec.log[0][3] == ("clear", [True])
    assert rec.log[1][2] == 1
    assert rec.log[1][3] == (hva, ksm, gen, False, None)     # PTE cleared before change_pte
    assert rec.log[2][3] == ("clear", [True])                # new PTE installed before end
    assert rec.states["end"][old[0]] == ALLOCATED
    assert not mem.is_live(*old) and mem.is_live(ksm, gen) and mem.owner_of(ksm) == "ksm"
    assert mm.lookup(hva) == (ksm, gen) and mm.notifier_count == 0
    fd = mm.memfd_create(1)
    shared = mm.mmap(1, fd)
    with pytest.raises(ValueError):
        run(host, lambda th: mm.ksm_merge(th, shared))


def test_shared_ksm_page_survives_partial_unmap(host):
    mm, hva, rec = setup(host, npages=2)

    def body(th):
        k = yield from mm.ksm_merge(th, hva)
        yield from mm.ksm_merge(th, hva + PAGE, k)
        yield from mm.munmap(th, hva, 1)

    run(host, body)
    assert host.memory.is_live(*mm.lookup(hva + PAGE))


def test_age_and_test_young(host):
    mm, hva, rec = setup(host)
    rec.young = {hva + 3 * PAGE}
    ages = []

    def body(th):
        ages.append((yield from mm.age(th, hva, 4, flush=True)))
        ages.append((yield from mm.age(th, hva, 4, flush=True)))
        mm.fault(hva)
        ages.append((yield from mm.age(th, hva, 4, flush=False)))
        ys = []
        mm.fault(hva + PAGE)
        for i in range(4):
            ys.append((yield from mm.test_young(th, hva + i * PAGE)))
            ys.append((yield from mm.test_young(th, hva + i * PAGE)))
        return ys

    ys = run(host, body)["ret"]
    assert ages == [4, 1, 2]         # page 3 young on both sides counts once
    hooks = rec.hooks()
    assert hooks[:8] == ["clear_flush_young"] * 8
    assert hooks[8:12] == ["clear_young"] * 4
    assert [e[3] for e in rec.log[:4]] == [(hva + i * PAGE, hva + (i + 1) * PAGE) for i in range(4)]
    assert ys == [False, False, True, True, False, False, True, True]  # test_young does not clear
    assert hooks[12:] == ["test_young"] * 8


def test_exit_releases_then_frees_everything(host):
    mm, hva, rec = setup(host, memfd=True, block=1000)
    rec2 = Rec(host, mm, name="second")
    rec2.span = rec.span
    mm.register_notifier(rec2)
    anon = mm.mmap(3)
    mm.prefault(anon, 3)
    mem = host.memory
    assert mem.allocated == 7
    out = run(host, lambda th: mm.exit(th))
    for r in (rec, rec2):
        assert r.hooks() == ["release"] and r.log[0][3] == [True] * 4   # mapped at release
        assert r.states["release"].sum() == 7                          # nothing freed yet
    assert rec2.log[0][1] - rec.log[0][1] == 1000 + COSTS["notifier_call"]
    assert out["t"] >= rec2.log[0][1]
    assert mem.allocated == 0 and mm.notifiers == [] and mm.exited
    assert mm.memfds[0].closed
    # no hook reaches a released subscriber any more
    again = mm.mmap(2)
    mm.prefault(again, 2)
    run(host, lambda th: mm.munmap(th, again, 2))
    assert rec.hooks() == ["release"] and rec2.hooks() == ["release"]


@pytest.mark.parametrize("memfd", [False, True])
def test_partial_munmap_keeps_head_and_tail(host, memfd):
    mm, hva, rec = setup(host, npages=8, memfd=memfd)
    refs = [mm.lookup(hva + i * PAGE) for i in range(8)]
    run(host, lambda th: mm.munmap(th, hva + 2 * PAGE, 3))
    assert rec.log[0][3] == ("unmap", [True] * 3)
    for i in (0, 1, 5, 6, 7):
        assert mm.lookup(hva + i * PAGE) == refs[i]
        assert mm.fault(hva + i * PAGE) == refs[i]
    for i in (2, 3, 4):
        assert mm.lookup(hva + i * PAGE) is None
        with pytest.raises(ValueError):
            mm.fault(hva + i * PAGE)
    assert len(mm.vmas) == 2
    assert host.memory.allocated == (8 if memfd else 5)
    if memfd:   # the tail still maps the right file offsets when re-faulted
        run(host, lambda th: mm.madvise_dontneed(th, hva + 5 * PAGE, 3))
        assert [mm.fault(hva + i * PAGE) for i in (5, 6, 7)] == refs[5:]


def test_blocking_start_hook_delays_zap_and_end(host):
    mm, hva, rec = setup(host, block=1000)
    seen = []

    def observer(th):
        for _ in range(2):
            yield 600
            seen.append((host.engine.now, mm.lookup(hva) is not None, mm.notifier_count))

    host.spawn(observer, "observer")
    out = run(host, lambda th: mm.munmap(th, hva, 4))
    (_, t_start, _, _), (_, t_end, _, _) = rec.log
    zap = 4 * COSTS["host_pte_zap"]
    assert t_end - t_start == 1000 + zap + COSTS["notifier_call"]
    assert out["t"] == t_end
    assert seen == [(601, True, 1), (1201, False, 0)]


def test_nonblocking_hooks_take_only_call_costs(mkhost):
    host = mkhost(costs=COSTS)
    mm, hva, rec = setup(host)
    run(host, lambda th: mm.munmap(th, hva, 4))
    (_, t_start, _, _), (_, t_end, _, _) = rec.log
    assert t_end - t_start == 4 * COSTS["host_pte_zap"] + COSTS["notifier_call"]
