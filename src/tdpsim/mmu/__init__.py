"""The x86 MMU: SPTE format, page tables, the TDP MMU and its policies."""
