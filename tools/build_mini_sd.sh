#!/usr/bin/env bash
# Builds the embedded miniature Stable Diffusion (codi_jax/assets/mini_sd) from scratch:
# the autoencoder (configs/pretrain_vae.py: 32 px, then fine-tuned at 64 px), then the latent
# teacher in its space (configs/pretrain.py), stored in float16 (tools/to_fp16.py). Each step
# resumes from its workdir's checkpoints if interrupted.
# Usage: tools/build_mini_sd.sh [runs-folder]   (about 50 minutes on an idle 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-runs}"
ASSET=codi_jax/assets/mini_sd

python -m codi_jax.main --config=configs/pretrain_vae.py --workdir="$RUNS/vae"
python -m codi_jax.main --config=configs/pretrain_vae.py:finetune64 --workdir="$RUNS/vae64" \
  --config.model.vae="$RUNS/vae/export/vae"
mkdir -p "$ASSET"
rm -rf "$ASSET/vae" && cp -r "$RUNS/vae64/export/vae" "$ASSET/vae"

python -m codi_jax.main --config=configs/pretrain.py --workdir="$RUNS/pretrain" --config.model.vae="$ASSET/vae"
for part in unet scheduler model_index.json; do
  rm -rf "${ASSET:?}/$part" && cp -r "$RUNS/pretrain/export/$part" "$ASSET/$part"
done
python tools/to_fp16.py "$ASSET"
echo "built $ASSET"
