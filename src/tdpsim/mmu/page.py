"""Shadow pages (``struct kvm_mmu_page``): the header of one page table.

A shadow page (SP) is a table of 512 SPTEs living in a 4 KiB host page (allocated from the
host allocator, so a page table has a real PFN that parent SPTEs point to), plus the header
fields the TDP MMU uses: ``gfn``, ``role`` (a word with ``level``, ``invalid`` and the
address space), the root refcount ``tdp_mmu_root_count``, ``ptep`` (the parent entry, None
for roots), and the NX-recovery link.  The entries themselves, and the model-only
generation of the host page each leaf maps, belong to the page-table store (store.py),
which allocates, looks up and frees SPs; ``_spt`` / ``_gens`` / ``_kids`` are its private
slots.

An SP is a Resource whose keys are its entry indices: fast-mode bulks that read or write
entries declare them, and the store settles them before it touches those entries.
"""

from __future__ import annotations

from ..sim.engine import Resource
from .spte import pages_per_hpage

# role word layout (a subset of union kvm_mmu_page_role)
ROLE_LEVEL_MASK = 0xF
ROLE_CR0_WP = 1 << 8
ROLE_DIRECT = 1 << 10
ROLE_SMM = 1 << 16          # address space 1
ROLE_INVALID = 1 << 17


def make_role(level: int, as_id: int = 0, cr0_wp: bool = True) -> int:
    return level | ROLE_DIRECT | (ROLE_SMM if as_id else 0) | (ROLE_CR0_WP if cr0_wp else 0)


class ShadowPage(Resource):
    __slots__ = ("_spt", "_gens", "_kids", "gfn", "role", "level", "tdp_mmu_root_count", "ptep", "pfn",
                 "pgen", "lpage_disallowed", "freed", "unlinked", "unlink_t", "work", "id",
                 "zapped_by", "root", "__weakref__")

    def __init__(self, sid: int, gfn: int, role: int, pfn: int, pgen: int,
                 ptep: tuple["ShadowPage", int] | None):
        super().__init__()
        self.id = sid
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
