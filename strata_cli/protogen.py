"""Generates the Python code for protos/ (messages, gRPC stubs and .pyi), or checks it is fresh.

    python -m strata_cli.protogen PROTO_ROOT OUT_DIR [--check]

Generation runs into a temporary directory, so `--check` compares byte for byte with what
is committed and a failed run never leaves a half-written tree.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc


def generate(proto_root: Path, out_dir: Path) -> None:
    """Runs protoc over every .proto under proto_root into out_dir, with __init__.py files."""
    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root}")
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in {p.parent for p in out_dir.rglob("*_pb2.py")}:
        while package != out_dir:
            (package / "__init__.py").touch()
            package = package.parent


def tree(root: Path) -> dict[str, Path]:
    """Maps each file's path relative to root to its absolute path (caches excluded)."""
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("proto_root", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--check", action="store_true", help="fail when out_dir is stale")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(args.proto_root, fresh)
        if args.check:
            want, have = tree(fresh), tree(args.out_dir)
            stale = sorted(
                name
                for name in want.keys() | have.keys()
                if name not in want
                or name not in have
                or not filecmp.cmp(want[name], have[name], shallow=False)
            )
            if stale:
                print(f"{args.out_dir} is stale; run `make proto`. Differs: " + ", ".join(stale))
                return 1
            print(f"{args.out_dir} is fresh ({len(want)} files)")
            return 0
        shutil.rmtree(args.out_dir, ignore_errors=True)
        shutil.copytree(fresh, args.out_dir)
        print(f"generated {len(tree(args.out_dir))} files into {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
