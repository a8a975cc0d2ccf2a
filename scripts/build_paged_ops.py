"""Write the shipped paged-op library (paged_rewrite/custom_ops/paged_ops.onnxlib) from the
onnxscript sources. Run after editing paged_rewrite/custom_ops/paged_ops.py; a test fails until
the shipped file matches the sources.

    python scripts/build_paged_ops.py
"""

from __future__ import annotations

from paged_rewrite.custom_ops.emit import build_library
from paged_rewrite.custom_ops.library import LIBRARY_FILE


def main() -> None:
    LIBRARY_FILE.write_bytes(build_library())
    print(f"wrote {LIBRARY_FILE}")


if __name__ == "__main__":
    main()
