"""Builds the decree package: the gRPC code is generated from the repository's
proto/ (the one source of the wire protocol) by grpcio-tools, at build time.

The .proto files are looked for in $DECREE_PROTO, then ../../proto (this file's
place in the repository), then ./proto (a copy, for building elsewhere).
"""

import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def proto_root() -> str:
    candidates = [os.environ.get("DECREE_PROTO", ""), os.path.join(HERE, "..", "..", "proto"), os.path.join(HERE, "proto")]
    for candidate in candidates:
        if candidate and os.path.isdir(os.path.join(candidate, "decree", "v1")):
            return os.path.abspath(candidate)
    sys.exit("decree: the .proto files are not found (set DECREE_PROTO to the repository's proto/ directory)")


def generate(out: str) -> None:
    import grpc_tools
    from grpc_tools import protoc

    root = proto_root()
    files = sorted(
        os.path.join("decree", "v1", name)
        for name in os.listdir(os.path.join(root, "decree", "v1"))
        if name.endswith(".proto")
    )
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    os.makedirs(os.path.join(out, "decree", "v1"), exist_ok=True)
    args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + files) != 0:
        sys.exit("decree: protoc failed on " + root)
    with open(os.path.join(out, "decree", "v1", "__init__.py"), "w") as f:
        f.write('"""Generated from proto/decree/v1 by grpcio-tools at build time."""\n')


# Every build step (egg_info, build_py, sdist) reads decree/v1: generate it first.
generate(HERE)
setup()
