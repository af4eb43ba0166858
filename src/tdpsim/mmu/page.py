"""Shadow pages (``struct kvm_mmu_page``) and the per-VM page-table registry.

Dense storage: every shadow page (SP) has its own NumPy ``uint64[512]`` table (``spt``),
the 4 KiB host page it lives in (allocated from the host allocator, so a page table has a
real PFN that parent SPTEs point to), and the header fields the TDP MMU uses: ``gfn``,
``role`` (a word with ``level``, ``invalid`` and the address space), the root refcount
``tdp_mmu_root_count``, ``ptep`` (the parent entry, None for roots), and the NX-recovery
link.  ``gens`` is model-only metadata: for each leaf entry, the generation of the host page
it maps at the time it was installed, so an A/D write-back to a page freed since is caught.

An SP is a Resource: a fast-mode bulk that writes into it declares it, and every path that
reads or writes its entries settles it first (``PageTables.touch``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..host.memory import POISON
from ..sim.engine import Resource
from .spte import SPTE_ENTRIES, pages_per_hpage

if TYPE_CHECKING:
    from ..host.host import Host

# role word layout (a subset of union kvm_mmu_page_role)
ROLE_LEVEL_MASK = 0xF
ROLE_CR0_WP = 1 << 8
ROLE_DIRECT = 1 << 10
ROLE_SMM = 1 << 16          # address space 1
ROLE_INVALID = 1 << 17


def make_role(level: int, as_id: int = 0, cr0_wp: bool = True) -> int:
    return level | ROLE_DIRECT | (ROLE_SMM if as_id else 0) | (ROLE_CR0_WP if cr0_wp else 0)


class ShadowPage(Resource):
    __slots__ = ("spt", "gens", "gfn", "role", "level", "tdp_mmu_root_count", "ptep", "pfn",
                 "pgen", "lpage_disallowed", "freed", "unlinked", "unlink_t", "work", "id",
                 "zapped_by", "root", "__weakref__")

    def __init__(self, sid: int, gfn: int, role: int, pfn: int, pgen: int,
                 ptep: tuple["ShadowPage", int] | None):
        super().__init__()
        self.id = sid
        self.spt = np.zeros(SPTE_ENTRIES, dtype=np.uint64)
        self.gens = np.zeros(SPTE_ENTRIES, dtype=np.uint32)
        self.gfn = gfn
        self.role = role
        self.level = role & ROLE_LEVEL_MASK
        self.tdp_mmu_root_count = 0
        self.ptep = ptep
        self.pfn = pfn
        self.pgen = pgen
        self.lpage_disallowed = False
        self.freed = False
        self.unlinked = False
        self.unlink_t = -1
        #: the root this table belongs to (itself for a root)
        self.root = self if ptep is None else ptep[0].root
        self.work = None            # the root's zap work item (5.18)
        self.zapped_by: str | None = None

    # role helpers (kvm_mmu_page_role fields)
    @property
    def invalid(self) -> bool:
        return bool(self.role & ROLE_INVALID)

    @property
    def as_id(self) -> int:
        return 1 if self.role & ROLE_SMM else 0

    @property
    def is_root(self) -> bool:
        return self.ptep is None

    def gfn_of(self, index: int) -> int:
        """First gfn mapped by entry ``index``."""
        return self.gfn + index * pages_per_hpage(self.level)

    def span(self) -> int:
        """Number of 4 KiB pages the whole table covers."""
        return pages_per_hpage(self.level + 1)

    def __repr__(self) -> str:
        kind = "root" if self.ptep is None else "sp"
        return f"<{kind}#{self.id} L{self.level} gfn={self.gfn:#x}{' invalid' if self.invalid else ''}>"


class PageTables:
    """Allocation, lookup by PFN and freeing of a VM's page-table pages."""

    def __init__(self, host: "Host", name: str = "kvm"):
        self.host = host
        self.mem = host.memory
        self.name = name
        self.by_pfn: dict[int, ShadowPage] = {}
        self._next_id = 0
        self.allocated = 0
        self.freed = 0
        self.live = 0
        self.peak = 0

    def alloc(self, gfn: int, role: int, ptep=None) -> ShadowPage:
        """Allocate an SP (the kernel takes it from the vCPU's memory cache)."""
        pfn = self.mem.alloc(f"{self.name}:pt")
        sp = ShadowPage(self._next_id, gfn, role, pfn, int(self.mem.gen[pfn]), ptep)
        self._next_id += 1
        self.by_pfn[pfn] = sp
        self.allocated += 1
        self.live += 1
        if self.live > self.peak:
            self.peak = self.live
        return sp

    def lookup(self, pfn: int) -> ShadowPage | None:
        """The SP living at ``pfn`` (None if that page is not a live page table)."""
        return self.by_pfn.get(pfn)

    def free(self, sp: ShadowPage, who=None) -> None:
        """Free an SP's page: poison its table (late walkers see garbage), free the PFN."""
        if sp.freed:
            self.host.report("double_free", who, pfn=sp.pfn, owner=f"{self.name}:pt sp#{sp.id}")
            return
        sp.freed = True
        sp.spt.fill(POISON)
        del self.by_pfn[sp.pfn]
        self.mem.free(sp.pfn, who)
        self.freed += 1
        self.live -= 1
