"""Fill in the sha256 (and size) of every manifest entry, from files fetched here.

    python scripts/pin_weights.py --model flux-schnell [--manifest weights/manifest.json]

Run it on a machine with network access: it downloads what is missing into the cache (as
setup() does), hashes each file and writes the hashes into the manifest, so that later
downloads are verified against pinned values instead of trusted on first use.
"""

import argparse
import json
from pathlib import Path

from engine.weights import MANIFEST, Sources, cache_dir, ensure_files, load_manifest, sha256_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux-schnell")
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    args = p.parse_args()
    # HF_TOKEN for the gated hub files, or SVDQ_WEIGHTS_URL for a mirror (engine.weights.Sources)
    root = ensure_files(load_manifest(args.model, args.manifest), cache_dir() / args.model, sources=Sources.from_env())
    data = json.loads(args.manifest.read_text())
    for entry in data["models"][args.model]["files"]:
        path = root / entry["path"]
        entry["sha256"] = sha256_of(path)
        entry["size"] = path.stat().st_size
        print(f"{entry['sha256']}  {entry['size']:>14,d}  {entry['path']}")
    args.manifest.write_text(json.dumps(data, indent=2) + "\n")
    print(f"pinned {args.model} in {args.manifest}")


if __name__ == "__main__":
    main()
