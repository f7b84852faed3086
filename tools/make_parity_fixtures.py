"""Writes tests/fixtures/parity/: tiny random diffusers/transformers models and their PyTorch outputs.

Needs torch, diffusers and transformers (``pip install -e ".[parity]"``); the tests that read the
fixtures do not. Each fixture is a folder written by ``save_pretrained`` (``config.json`` +
safetensors) plus ``reference.npz``: the inputs, in PyTorch layout (NCHW), and the outputs of the
PyTorch model in fp32. The models are random but tiny (the whole set is a few MB) and keep every
architectural switch of the real checkpoints they stand for:

  unet_sd1     int attention_head_dim, 1x1-conv transformer projections, 2 layers per block
  unet_sd2     per-block head counts, linear projections, upcast_attention
  controlnet   ControlNetModel.from_unet(unet_sd1) with an 8x conditioning embedding, like SD's
  vae          AutoencoderKL with a mid-block attention
  clip         CLIPTextModel, quick_gelu, legacy eos_token_id=2 (as SD 1.x's text encoder)
  clip_sd2     CLIPTextModel, gelu (as SD 2.x's OpenCLIP-H text encoder)

Usage: python tools/make_parity_fixtures.py [--out tests/fixtures/parity]
"""
from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

UNET_SD1 = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=4,
    cross_attention_dim=24,
    norm_num_groups=4,
)
UNET_SD2 = dict(
    UNET_SD1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    upcast_attention=True,
)
VAE = dict(
    sample_size=32,
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
)
CLIP = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
CLIP_SD2 = dict(CLIP, hidden_act="gelu", num_hidden_layers=2)


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Replace every parameter by N(0, 0.2^2) (norm scales around 1): diffusers zero-initialises
    conv_out and ControlNet's output convolutions, which would make parity trivially exact."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.2 * torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + noise if ("norm" in name and name.endswith("weight")) else noise)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def _unet_inputs(config: dict, generator: torch.Generator, residuals: bool = False) -> dict[str, np.ndarray]:
    size = config["sample_size"]
    inputs = {
        "sample": _np(torch.randn(2, config["in_channels"], size, size, generator=generator)),
        "timesteps": np.array([7, 981], np.int64),
        "encoder_hidden_states": _np(torch.randn(2, 5, config["cross_attention_dim"], generator=generator)),
    }
    if residuals:
        # One residual per skip connection (conv_in, each resnet, each downsampler), then the mid block.
        channels = config["block_out_channels"]
        shapes = [(channels[0], size)]
        for i, c in enumerate(channels):
            shapes += [(c, size)] * config["layers_per_block"]
            if i < len(channels) - 1:
                size //= 2
                shapes.append((c, size))
        shapes.append((channels[-1], size))
        for i, (c, s) in enumerate(shapes):
            key = "mid_residual" if i == len(shapes) - 1 else f"residual_{i}"
            inputs[key] = _np(torch.randn(2, c, s, s, generator=generator))
    return inputs


def unet_reference(model: UNet2DConditionModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """UNet output; with ``residual_*`` inputs also the output with those ControlNet residuals added."""
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = {"out": _np(model(t["sample"], t["timesteps"], t["encoder_hidden_states"]).sample)}
        if "mid_residual" in t:
            down = [t[f"residual_{i}"] for i in range(sum(k.startswith("residual_") for k in t))]
            out["out_with_residuals"] = _np(model(
                t["sample"], t["timesteps"], t["encoder_hidden_states"],
                down_block_additional_residuals=down, mid_block_additional_residual=t["mid_residual"],
            ).sample)
    return out


def controlnet_reference(model: ControlNetModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        res = model(t["sample"], t["timesteps"], t["encoder_hidden_states"], t["controlnet_cond"], return_dict=True)
    out = {f"down_{i}": _np(r) for i, r in enumerate(res.down_block_res_samples)}
    out["mid"] = _np(res.mid_block_res_sample)
    return out


def vae_reference(model: AutoencoderKL, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        posterior = model.encode(t["image"]).latent_dist
        decoded = model.decode(t["latents"]).sample
    return {"mean": _np(posterior.mean), "logvar": _np(posterior.logvar), "decoded": _np(decoded)}


def clip_reference(model: CLIPTextModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(inputs["input_ids"]), output_hidden_states=True)
    return {
        "last_hidden_state": _np(out.last_hidden_state),
        "penultimate_hidden_state": _np(out.hidden_states[-2]),
        "pooler_output": _np(out.pooler_output),
    }


def _clip_ids(config: dict, generator: torch.Generator) -> np.ndarray:
    # SD-style prompts: BOS, words, EOS, then padding; the second prompt is shorter.
    ids = torch.randint(3, config["vocab_size"], (2, 16), generator=generator)
    ids[:, 0] = config["bos_token_id"]
    ids[0, 11] = config["eos_token_id"]
    ids[0, 12:] = config["pad_token_id"]
    ids[1, 6] = config["eos_token_id"]
    ids[1, 7:] = config["pad_token_id"]
    return ids.numpy().astype(np.int64)


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    """The random model and inputs of fixture ``name`` (deterministic in ``seed``)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if name in ("unet_sd1", "unet_sd2"):
        config = UNET_SD1 if name == "unet_sd1" else UNET_SD2
        model = UNet2DConditionModel(**config)
        inputs = _unet_inputs(config, generator, residuals=name == "unet_sd1")
    elif name == "controlnet":
        model = ControlNetModel.from_unet(
            UNet2DConditionModel(**UNET_SD1), conditioning_embedding_out_channels=(4, 8, 8, 16)
        )
        inputs = _unet_inputs(UNET_SD1, generator)
        size = 8 * UNET_SD1["sample_size"]
        inputs["controlnet_cond"] = _np(torch.rand(2, 3, size, size, generator=generator))
    elif name == "vae":
        model = AutoencoderKL(**VAE)
        size = VAE["sample_size"]
        factor = 2 ** (len(VAE["block_out_channels"]) - 1)
        inputs = {
            "image": _np(torch.rand(2, 3, size, size, generator=generator) * 2 - 1),
            "latents": _np(torch.randn(2, VAE["latent_channels"], size // factor, size // factor, generator=generator)),
        }
    elif name in ("clip", "clip_sd2"):
        config = CLIP if name == "clip" else CLIP_SD2
        model = CLIPTextModel(CLIPTextConfig(**config))
        inputs = {"input_ids": _clip_ids(config, generator)}
    else:
        raise ValueError(f"unknown fixture {name!r}")
    _randomize(model, generator)
    return model.eval(), inputs


REFERENCES = {
    "unet_sd1": unet_reference,
    "unet_sd2": unet_reference,
    "controlnet": controlnet_reference,
    "vae": vae_reference,
    "clip": clip_reference,
    "clip_sd2": clip_reference,
}


def reference(name: str, model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch outputs of fixture ``name``'s model on ``inputs``."""
    return REFERENCES[name](model, inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "parity"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in REFERENCES:
        folder = os.path.join(args.out, name)
        shutil.rmtree(folder, ignore_errors=True)
        model, inputs = build(name)
        model.save_pretrained(folder)
        refs = reference(name, model, inputs)
        np.savez_compressed(os.path.join(folder, "reference.npz"), **{f"in_{k}": v for k, v in inputs.items()},
                            **{f"out_{k}": v for k, v in refs.items()})
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params} parameters, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
