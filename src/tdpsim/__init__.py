"""tdpsim: a deterministic executable model of the Linux KVM x86 TDP MMU."""

__version__ = "0.1.0"
