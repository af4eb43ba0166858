"""The host page allocator: generations, LIFO reuse, poisoning, use-after-free detection."""

import numpy as np
import pytest

from tdpsim.host.memory import ALLOCATED, FREE, POISON


@pytest.fixture
def host(mkhost):
    return mkhost()


def test_alloc_bumps_generation_and_owner(host):
    mem = host.memory
    p = mem.alloc("a")
    g1 = mem.gen_of(p)
    assert p != 0 and mem.state_of(p) == ALLOCATED and mem.owner_of(p) == "a"
    assert mem.is_live(p, g1) and mem.allocated == 1
    mem.free(p)
    assert mem.state_of(p) == FREE and not mem.is_live(p, g1)
    assert mem.alloc("b") == p
    assert mem.gen_of(p) == g1 + 1
    assert mem.is_live(p, g1 + 1) and not mem.is_live(p, g1)
    assert mem.owner_of(p) == "b"


def test_distinct_pages_while_allocated(host):
    mem = host.memory
    pfns = [mem.alloc() for _ in range(5)]
    assert len(set(pfns)) == 5 and 0 not in pfns
    assert mem.allocated == 5 and mem.peak == 5


def test_free_poisons_registered_content(host):
    mem = host.memory
    buf = np.arange(512, dtype=np.uint64)
    other = np.arange(512, dtype=np.uint64)
    p = mem.alloc("pt", content=buf)
    q = mem.alloc("pt2", content=other)
    mem.free(p)
    assert (buf == POISON).all()
    assert (other == np.arange(512)).all()   # only the freed page is poisoned
    mem.free(q)
    assert (other == POISON).all()


def test_free_list_is_lifo(host):
    mem = host.memory
    a, b, c = (mem.alloc() for _ in range(3))
    mem.free(a)
    mem.free(c)
    mem.free(b)
    assert [mem.alloc(), mem.alloc(), mem.alloc()] == [b, c, a]
    assert mem.alloc() not in (a, b, c)


def test_stale_reference_while_free_is_use_after_free(host):
    mem = host.memory
    p = mem.alloc("x")
    g = mem.gen_of(p)
    assert mem.check(p, g) and mem.write_back(p, g)
    assert host.reports == []
    mem.free(p)
    assert mem.check(p, g, what="walk") is False
    assert mem.write_back(p, g) is False
    r1, r2 = host.reports_of("use_after_free")
    assert (r1["pfn"], r1["reused"], r1["now_owner"], r1["what"]) == (p, False, None, "walk")
    assert r2["pfn"] == p and r2["reused"] is False and "write-back" in r2["what"]


def _idle(th):
    yield 1


def test_stale_reference_after_reuse_names_new_owner(host):
    mem = host.memory
    p = mem.alloc("old")
    g = mem.gen_of(p)
    mem.free(p)
    assert mem.alloc("thief") == p
    th = host.spawn(_idle, "walker")
    assert mem.check(p, g, th) is False
    assert mem.write_back(p, g, None, what="accessed") is False
    r1, r2 = host.reports_of("use_after_free")
    assert r1["reused"] is True and r1["now_owner"] == "thief" and r1["task"] == "walker"
    assert r2["reused"] is True and r2["now_owner"] == "thief"
    assert r2["what"] == "accessed write-back"
    # the new owner's reference is fine
    assert mem.check(p, mem.gen_of(p)) and len(host.reports) == 2


def test_double_free_reported_and_harmless(host):
    mem = host.memory
    p = mem.alloc("x")
    mem.free(p)
    mem.free(p)
    (r,) = host.reports_of("double_free")
    assert r["pfn"] == p and r["owner"] == "x"
    assert mem.allocated == 0 and mem.frees == 1
    # the page is on the free list once: two allocations give two different pages
    a, b = mem.alloc(), mem.alloc()
    assert a == p and b != p


def test_alloc_many_reuses_lifo_then_fresh(host):
    mem = host.memory
    a, b, c = (mem.alloc() for _ in range(3))
    mem.free(a)
    mem.free(b)
    gb = mem.gen_of(b)
    out = mem.alloc_many(4, "bulk")
    assert out[:2].tolist() == [b, a]
    assert len(set(out.tolist()) | {c}) == 5
    assert all(mem.state_of(p) == ALLOCATED for p in out.tolist()) and mem.gen_of(b) == gb + 1
    assert all(mem.owner_of(p) == "bulk" for p in out.tolist())
    assert mem.allocated == 5 and mem.allocs == 7


def test_free_many_poisons_pushes_lifo_and_detects_double_free(host):
    mem = host.memory
    pfns = mem.alloc_many(3, "bulk")
    buf = np.zeros(512, dtype=np.uint64)
    p = mem.alloc("pt", content=buf)
    gens = mem.gens_of(pfns)
    mem.free_many(np.append(pfns, p))
    assert (buf == POISON).all()
    assert all(mem.state_of(p) == FREE for p in pfns.tolist()) and mem.allocated == 0
    assert not mem.check(int(pfns[0]), int(gens[0]))
    assert mem.alloc() == p                                  # freed last, handed out first
    assert mem.alloc_many(3).tolist() == pfns[::-1].tolist()
    mem.free_many(pfns)
    mem.free_many(pfns[:2])
    assert sorted(r["pfn"] for r in host.reports_of("double_free")) == sorted(pfns[:2].tolist())
    assert mem.allocated == 1


def test_free_many_duplicate_in_batch_is_double_free(host):
    mem = host.memory
    p = mem.alloc("x")
    mem.alloc("keep")
    mem.free_many(np.array([p, p]))
    assert len(host.reports_of("double_free")) == 1
    assert mem.allocated == 1
    assert mem.alloc() != mem.alloc()


def test_memory_limit_raises(mkhost):
    host = mkhost(memory_pages=3)
    mem = host.memory
    pfns = [mem.alloc() for _ in range(3)]
    with pytest.raises(MemoryError):
        mem.alloc()
    with pytest.raises(MemoryError):
        mem.alloc_many(1)
    mem.free(pfns[1])
    assert mem.alloc() == pfns[1]          # a freed page can be reused at the limit
    mem.free_many(np.array(pfns[:2]))
    assert sorted(mem.alloc_many(2).tolist()) == sorted(pfns[:2])
    with pytest.raises(MemoryError):
        mem.alloc_many(1)
    assert mem.allocated == 3


def test_failed_alloc_many_keeps_free_list(mkhost):
    host = mkhost(memory_pages=4)
    mem = host.memory
    pfns = [mem.alloc() for _ in range(4)]
    mem.free(pfns[0])
    mem.free(pfns[1])
    with pytest.raises(MemoryError):
        mem.alloc_many(3)
    assert mem.allocated == 2
    assert mem.alloc() == pfns[1]
    assert mem.alloc() == pfns[0]
