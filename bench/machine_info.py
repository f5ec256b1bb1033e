"""What machine and environment a benchmark ran on, for the header of its table."""

import hashlib
import platform
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return next(names, platform.processor())


def lock_digest() -> str:
    """The first 12 hex digits of requirements.lock's SHA-256: which locked environment ran."""
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]


def machine() -> str:
    """CPU model and lock digest, e.g. 'AMD EPYC 7B13, requirements.lock 3f2a9c01d4e5'."""
    return f"{cpu_model()}, requirements.lock {lock_digest()}"
