"""The main job: start the real Cog HTTP server, send one prediction, write the images.

    python scripts/demo_predict.py [--prompt ...] [--out out/] [--seed 42] [input=value ...]

Without a GPU the server serves the embedded tiny model (docs/tiny-model.md): it draws one
coloured shape on a plain background, so the default prompt is in its words; every stage of the
real path runs. Prints the paths of the written files.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from cog_client import CogServer, save_outputs

from engine.tiny_scenes import DEFAULT_PROMPT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("inputs", nargs="*", help="extra inputs as name=value (JSON values), e.g. num_outputs=2")
    args = p.parse_args()
    inputs = {"prompt": args.prompt, "seed": args.seed}
    for kv in args.inputs:
        name, _, value = kv.partition("=")
        try:
            inputs[name] = json.loads(value)
        except json.JSONDecodeError:
            inputs[name] = value

    t0 = time.perf_counter()
    with CogServer() as server:
        print(f"starting the Cog HTTP server at {server.url} (log: {server.log})", file=sys.stderr)
        health = server.wait_ready()
        if health.get("status") != "READY":
            sys.exit(f"setup failed: {health.get('setup', {}).get('logs', '')[-3000:]}")
        print(
            f"ready in {time.perf_counter() - t0:.1f} s; POST /predictions {json.dumps(inputs)}",
            file=sys.stderr,
        )
        status, resp = server.predict(inputs)
        if status != 200 or resp.get("status") != "succeeded":
            sys.exit(
                f"prediction failed (HTTP {status}): {resp.get('error') or resp.get('detail')}\n{resp.get('logs', '')}"
            )
        print(resp.get("logs", ""), file=sys.stderr)
        for path in save_outputs(resp, args.out):
            print(path.resolve())


if __name__ == "__main__":
    main()
