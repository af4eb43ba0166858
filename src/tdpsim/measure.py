"""Peak resident memory of this process, resettable between runs (Linux), for the
"wall time, peak RSS" lines.  Never influences a simulated result."""

from __future__ import annotations

import resource


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) via /proc/self/clear_refs; False if not
    possible (then ``peak_mib`` is the peak since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w") as fp:
            fp.write("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    """VmHWM in MiB (since the last ``reset_peak``), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fp:
            for line in fp:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
