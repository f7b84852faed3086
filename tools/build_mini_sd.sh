#!/usr/bin/env bash
# Builds the embedded miniature Stable Diffusion (codi_jax/assets/mini_sd) from scratch:
# the autoencoder (configs/pretrain_vae.py), then the latent teacher in its space
# (configs/pretrain.py). Each step resumes from its workdir's checkpoints if interrupted.
# Usage: tools/build_mini_sd.sh [runs-folder]   (about 1.5 hours on an idle 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-runs}"
ASSET=codi_jax/assets/mini_sd

python -m codi_jax.main --config=configs/pretrain_vae.py --workdir="$RUNS/vae"
mkdir -p "$ASSET"
rm -rf "$ASSET/vae" && cp -r "$RUNS/vae/export/vae" "$ASSET/vae"

python -m codi_jax.main --config=configs/pretrain.py --workdir="$RUNS/pretrain"
for part in unet scheduler model_index.json; do
  rm -rf "${ASSET:?}/$part" && cp -r "$RUNS/pretrain/export/$part" "$ASSET/$part"
done
echo "built $ASSET"
