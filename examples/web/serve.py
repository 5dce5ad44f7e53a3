"""Serve the web example: build its assets, then serve examples/web over HTTP.

    python examples/web/serve.py [--port 8000]

Then open http://localhost:8000/ and press Train.  Needs onnxgrad installed and
``npm ci`` run once in examples/web (for onnxruntime-web).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_assets import build  # noqa: E402


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript",
                      ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def server(root: pathlib.Path, port: int) -> http.server.ThreadingHTTPServer:
    return http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), functools.partial(Handler, directory=str(root)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if not (HERE / "node_modules" / "onnxruntime-web").is_dir():
        sys.exit("examples/web/node_modules is missing: run 'npm ci' in examples/web first")
    build(HERE / "build")
    httpd = server(HERE, args.port)
    print(f"serving http://localhost:{args.port}/ (Ctrl-C stops)")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
