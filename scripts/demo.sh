#!/usr/bin/env bash
# Set up, then reconstruct the bundled sample knee (AP + lateral DRR of a held-out phantom)
# with the bundled model into out/sample/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt
. .venv/bin/activate
kneerecon reconstruct --ap Resources/Sample/ap.nrrd --lateral Resources/Sample/lateral.nrrd \
  --side "$(python -c 'import json;print(json.load(open("Resources/Sample/meta.json"))["side"])')" \
  --output out/sample --force
echo "Open out/sample/overlay.png, or load out/sample/segmentation.seg.nrrd and the STL files in 3D Slicer."
