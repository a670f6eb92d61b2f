"""Regenerate the committed gRPC stubs of this package from ``grpc_predict_v2.proto`` (``make grpc``).

    python3.11 service/grpc/generate.py      # writes grpc_predict_v2_pb2{.py,.pyi,_grpc.py} here

grpcio-tools runs from a throwaway venv (``build/grpc-tools``), never the project's: it pins protobuf.
Its version fixes what the stubs need at run time (the gencode checks both): grpcio-tools 1.81.1
bundles protoc 6.33.5, so the stubs load on protobuf >= 6.33.5 (7.x included) and grpcio >= 1.81.1,
the floors of pyproject's ``grpc`` extra and what tritonclient 2.73 needs too.

One edit after protoc: the messages go into a descriptor pool of their own, not protobuf's default
one. tritonclient (and MLServer, KServe) register the same ``inference.*`` names from their own copy
of the protocol in the default pool, and a second registration there fails to import
(``duplicate symbol 'inference.ServerLiveRequest'``); in a private pool both load in one process.
"""
from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

GRPC_TOOLS = "grpcio-tools==1.81.1"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTO = HERE / "grpc_predict_v2.proto"
TOOLS = ROOT / "build" / "grpc-tools"
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = ("# A pool of its own: other copies of the protocol (tritonclient's) register the same names in\n"
                "# the default pool (service/grpc/generate.py).\n"
                "DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile(")


def tools_python() -> Path:
    """The tools venv's python, made (or remade) when it lacks GRPC_TOOLS."""
    python = TOOLS / "bin" / "python"
    have = ""
    if python.exists():
        have = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('grpcio-tools'))"],
                              capture_output=True, check=False, text=True).stdout.strip()
    if have != GRPC_TOOLS.split("==")[1]:
        venv.create(TOOLS, with_pip=True, clear=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", GRPC_TOOLS], check=True)
    return python


def main() -> int:
    python = tools_python()
    # -I the repository root: the stubs import each other as service.grpc.grpc_predict_v2_pb2.
    subprocess.run([python, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={ROOT}",
                    f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", str(PROTO)], check=True)
    pb2 = HERE / "grpc_predict_v2_pb2.py"
    text = pb2.read_text()
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit(f"{pb2}: protoc's output changed; expected one {DEFAULT_POOL!r}")
    pb2.write_text(text.replace(DEFAULT_POOL, PRIVATE_POOL))
    print(f"wrote {', '.join(p.name for p in sorted(HERE.glob('grpc_predict_v2_pb2*')))} with {GRPC_TOOLS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
