"""Regenerate ``fedlab/proto/`` from ``protos/fedlab/proto/*.proto``.

Run from anywhere with the ``dev`` extra installed (it pins ``grpcio-tools`` and
``mypy-protobuf``, so the output is byte-identical everywhere); CI runs it and fails on any
difference from the committed files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"


def main() -> int:
    sources = sorted(
        str(p.relative_to(PROTOS)) for p in (PROTOS / "fedlab" / "proto").glob("*.proto")
    )
    include = Path(protoc.__file__).parent / "_proto"
    # mypy-protobuf's plugin is installed beside this interpreter, maybe not on PATH.
    plugin = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
        *sources,
    ]
    code = int(protoc.main(args))
    if code != 0:
        print(f"protoc failed with status {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
