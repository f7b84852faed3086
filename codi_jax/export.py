"""A distilled model as a diffusers-layout pipeline folder: ``export`` writes it, ``load_exported``
reads it back (also the shipped ``embedded:<name>`` models).

The folder holds the teacher pipeline's other components, the distilled ``unet/``, the adapter
(``controlnet/`` in diffusers format for PE-CoDi, ``cond_encoder/`` for full CoDi), a
``scheduler/`` and ``codi.json`` (the adapted-model config, prediction type and teacher grid).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from codi_jax import models
from codi_jax.models import lora
from codi_jax.config_lib import embedded_path, model_config, model_grid
from codi_jax.modeling import Student, Teacher, load_teacher, make_student
from codi_jax.models.adapters import controlnet_config, init_adapted_params
from codi_jax.models.io import write_folder_atomically


def export(student: Student, params: Any, out_dir: str, cfg: ml_collections.ConfigDict) -> str:
    """Writes a diffusers-layout pipeline folder: the teacher pipeline's other components copied,
    the distilled ``unet/``, the adapter (``controlnet/`` in diffusers format for PE-CoDi,
    ``cond_encoder/`` for full CoDi) and ``codi.json``. Written beside ``out_dir`` and swapped
    into place (``write_folder_atomically``): an interrupted export never looks complete, and a
    previous export stays until the new one is whole."""
    from safetensors.numpy import save_file

    teacher = student.teacher
    params = jax.device_get(params)
    # LoRA: the folders hold the merged weights; the UNet's factors also go alone to lora/, in
    # the PEFT layout diffusers' load_lora_weights reads (applied to the teacher's UNet).
    unet_lora = lora.peft_state_dict(params["unet"]) if lora.has_lora(params["unet"]) else {}
    params = jax.device_get(lora.merge(params))

    def write(tmp: str) -> None:
        if teacher.root:
            for entry in os.listdir(teacher.root):
                src = os.path.join(teacher.root, entry)
                # The teacher's own model card (README.md) does not describe the distilled model.
                # Nor is its scheduler CoDi's sampler (SD ships a PNDM one): written below.
                if entry not in ("unet", "controlnet", "cond_encoder", "scheduler", "codi.json", "README.md") \
                        and not entry.startswith("."):
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, entry))
        models.save(student.module.unet, params["unet"], os.path.join(tmp, "unet"), "unet",
                    config=teacher.unet_config)
        adapter = student.config["adapter"]
        if adapter == "controlnet":
            models.save(student.module.adapter, params["adapter"], os.path.join(tmp, "controlnet"),
                        "controlnet", config=controlnet_config(student.config))
        elif adapter == "cond_encoder":
            os.makedirs(os.path.join(tmp, "cond_encoder"))
            flat = traverse_util.flatten_dict(params["adapter"], sep="/")
            # ascontiguousarray turns μ's 0-d array into shape (1,): keep the original shape.
            save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in flat.items()},
                      os.path.join(tmp, "cond_encoder", "model.safetensors"))
        if student.guidance_input:   # the w embedding of a guidance-aware model (diffusion/guidance.py)
            os.makedirs(os.path.join(tmp, "guidance"))
            save_file({"kernel": np.ascontiguousarray(params["w_embed"]["kernel"])},
                      os.path.join(tmp, "guidance", "w_embed.safetensors"))
        if teacher.latent and not os.path.exists(os.path.join(tmp, "vae")):
            # A teacher trained from scratch in a separately trained VAE's space (no pipeline root).
            models.save(teacher.vae, jax.device_get(teacher.vae_params), os.path.join(tmp, "vae"), "vae")
        # CoDi's sampler: diffusers pipelines that load this folder step on the teacher grid
        # exactly as codi_jax does.
        os.makedirs(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(_scheduler_config(teacher), f, indent=2)
        index_path = os.path.join(tmp, "model_index.json")
        index = json.load(open(index_path)) if os.path.exists(index_path) else {"_class_name": "CoDiPipeline"}
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        if teacher.latent:
            index["vae"] = ["diffusers", "AutoencoderKL"]
        index["scheduler"] = ["diffusers", "DDIMScheduler"]
        if adapter == "controlnet":
            index["controlnet"] = ["diffusers", "ControlNetModel"]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "codi.json"), "w") as f:
            task = cfg.data.task
            json.dump({"adapted_config": {k: v for k, v in student.config.items() if k != "unet"},
                       "prediction_type": teacher.prediction_type, "grid": model_grid(cfg),
                       "sampler": "renoise" if cfg.objective == "flash" else "codi",
                       "text_layer": student.text_layer, "prompt": student.prompt,
                       "guidance_input": student.guidance_input, "guidance": student.guidance,
                       # What `codi_jax.predict` needs to build conditions as the training did.
                       "task": task, "image_size": cfg.data.image_size,
                       "task_options": cfg.data[task].to_dict() if task in TASK_OPTIONS else {}},
                      f, indent=2, default=list)
        if unet_lora:
            os.makedirs(os.path.join(tmp, "lora"))
            save_file(unet_lora, os.path.join(tmp, "lora", "pytorch_lora_weights.safetensors"),
                      metadata={"format": "pt", "lora_rank": str(cfg.model.lora_rank)})
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(student, cfg, bool(unet_lora)))

    return write_folder_atomically(out_dir, write)


def model_card(student: Student, cfg: ml_collections.ConfigDict, has_lora: bool = False) -> str:
    """The export's README: what the model is and how to run it, here and in PyTorch/diffusers
    (the scheduler settings that reproduce CoDi's sampler)."""
    adapter, grid = student.config["adapter"], model_grid(cfg)
    hint = student.config["cond_embedding_channels"] is not None
    divisors = ", ".join(str(n) for n in range(1, grid + 1) if grid % n == 0)
    text = student.teacher.text_encoder is not None
    kind = {"cond_encoder": "full CoDi (the μ-blended conditional encoder in `cond_encoder/`)",
            "controlnet": "PE-CoDi (a diffusers `ControlNetModel` in `controlnet/`, the UNet frozen)"}.get(adapter, adapter)
    cond = ("the control image in [0, 1] at the output size (a hint stem reads pixels)" if hint else
            "the VAE latent (posterior mode × `scaling_factor`) of the condition in [−1, 1]")
    lines = [
        f"# A CoDi {cfg.data.task} model distilled by codi_jax",
        "",
        f"{kind}; {student.teacher.prediction_type} prediction on a teacher grid of {grid} steps; the "
        f"condition enters as {cond}. `codi.json` holds the adapted-model config, the task and "
        "how its conditions are built.",
        "",
        "## codi_jax",
        "",
        "```bash",
        "python -m codi_jax.predict --model=<this folder> --input=<picture or folder> --output=out/ --steps=4",
        "```",
        "",
        "## PyTorch / diffusers",
        "",
        "`unet/`, `vae/`" + (", `text_encoder/`" if text else "") + (", `controlnet/`" if adapter == "controlnet" else "")
        + " are plain diffusers / transformers folders (`from_pretrained` reads each). `scheduler/` is "
        "CoDi's sampler as a `DDIMScheduler`: `timestep_spacing=\"trailing\"`, `set_alpha_to_one=True`, "
        f"`steps_offset=0`, `clip_sample=False`, `prediction_type=\"{student.teacher.prediction_type}\"`; "
        f"with `num_inference_steps` dividing the grid ({divisors}) its timesteps are CoDi's "
        "(4 steps on a 20-grid: 999, 749, 499, 249, then clean data). No classifier-free guidance "
        "(`guidance_scale=1`), `eta=0`.",
        "",
    ]
    if cfg.objective == "flash":
        lines[-1:-1] = [
            "", "Distilled with Flash Diffusion: its sampler re-noises x̂ with fresh noise between "
            "steps instead of DDIM's deterministic step (diffusers' `LCMScheduler` steps this way; "
            "parity with it is not tested). `codi.json` says `\"sampler\": \"renoise\"`, which "
            "`codi_jax.predict` follows."]
    if student.guidance_input:
        lines[-1:-1] = [
            "", f"Guidance-aware: distilled from classifier-free-guided targets, it reads the guidance "
            f"weight w itself (one evaluation per step) and samples at w = {student.guidance:g} "
            f"(diffusers' scale {1 + student.guidance:g}); `guidance/w_embed.safetensors` maps w's "
            "sinusoidal features onto the condition's channels (`codi_jax/diffusion/guidance.py`), "
            "added to the condition before the model reads it. `codi_jax.predict --guidance` and "
            "`codi_jax.torch.CoDiPipeline(..., guidance=w)` pick another w; diffusers' own ControlNet "
            "pipeline cannot add it."]
    if has_lora:
        lines += [
            f"`lora/pytorch_lora_weights.safetensors`: the UNet's rank-{cfg.model.lora_rank} LoRA alone "
            "(PEFT keys, scale 1), for the teacher's UNet — `unet/` here already has it merged in:",
            "",
            "```python",
            "pipe = StableDiffusionPipeline.from_pretrained(<the teacher>)",
            "pipe.load_lora_weights(folder + \"/lora\")",
            "```",
            "",
        ]
    if adapter == "controlnet" and hint and text:
        lines += [
            "In diffusers' own ControlNet pipeline:",
            "",
            "```python",
            "from diffusers import StableDiffusionControlNetPipeline",
            "from codi_jax.torch.codi import pipeline_kwargs",
            "",
            "pipe = StableDiffusionControlNetPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,",
            "                                                        requires_safety_checker=False)",
            "images = pipe(prompt, image=control_image_01, **pipeline_kwargs(folder, 4)).images",
            "```",
            "",
        ]
    lines += [
        "Any adapter, any condition, with `pip install torch diffusers` beside codi_jax "
        "(`codi_jax.torch`, which the JAX code never imports):",
        "",
        "```python",
        "from codi_jax.torch import CoDiPipeline",
        "",
        "pipe = CoDiPipeline.from_export(folder)",
        "images = pipe(cond, latents=torch.randn(1, 4, h // f, w // f), num_inference_steps=4)  # NCHW, [0, 1]",
        "```",
        "",
        "`cond` is NCHW in [−1, 1] at the output size, built as `codi_jax.predict` builds it (SR: "
        "the bicubic upsampling of the low-resolution picture). Both match `codi_jax.predict` "
        "within 1e-3 on tiny random models (`tests/test_torch_interop.py`).",
    ]
    if not text:
        lines += ["", "This model's UNet self-attends only (`cross_attention_dim: null`), which "
                  "diffusers' `UNet2DConditionModel` does not build: it runs in codi_jax only."]
    return "\n".join(lines) + "\n"


# The tasks whose data config section (``data.<task>``) shapes the condition at prediction time.
TASK_OPTIONS = ("sr", "depth", "canny")


def _scheduler_config(teacher: Teacher) -> dict:
    config = {"_class_name": "DDIMScheduler", "prediction_type": teacher.prediction_type,
              "timestep_spacing": "trailing", "steps_offset": 0, "clip_sample": False, "set_alpha_to_one": True}
    if teacher.schedule.name in ("scaled_linear", "linear"):
        betas = 1.0 - teacher.schedule.alphas_cumprod / np.concatenate([[1.0], teacher.schedule.alphas_cumprod[:-1]])
        # The betas were built in float32; 6 significant digits recover the configured values.
        config.update(beta_schedule=teacher.schedule.name, num_train_timesteps=len(betas),
                      beta_start=float(f"{betas[0]:.6g}"), beta_end=float(f"{betas[-1]:.6g}"))
    return config


def load_exported(path: str, **model_overrides: Any) -> tuple[Student, dict, dict, int]:
    """Reads an ``export`` folder: returns (student, params, aux params, teacher grid).

    ``model_overrides`` set ``cfg.model`` fields such as ``dtype``. The adapter's weights are
    checked against the shapes the adapted config implies before anything is returned.
    """
    if path.startswith("embedded:"):  # a model shipped in codi_jax/assets, e.g. "embedded:demo_codi_sr"
        path = embedded_path(path.split(":", 1)[1])
    with open(os.path.join(path, "codi.json")) as f:
        meta = json.load(f)
    m = model_config()
    m.pretrained = path
    m.prediction_type = meta["prediction_type"]
    m.text_layer = meta.get("text_layer", "last")
    m.prompt = meta.get("prompt", "")
    m.guidance_input = meta.get("guidance_input", False)
    m.guidance = meta.get("guidance", 0.0)
    for k, v in model_overrides.items():
        setattr(m, k, v)
    teacher = load_teacher(m, jax.random.PRNGKey(0))
    config = dict(meta["adapted_config"], unet=teacher.unet_config)
    student = make_student(m, teacher, config)
    params = {"unet": teacher.unet_params}
    if config["adapter"] == "controlnet":
        _, params["adapter"] = models.load(path, "controlnet")
    elif config["adapter"] == "cond_encoder":
        from safetensors.numpy import load_file

        expected = jax.eval_shape(lambda: init_adapted_params(config, teacher.unet_params, jax.random.PRNGKey(0)))
        flat = load_file(os.path.join(path, "cond_encoder", "model.safetensors"))
        want = traverse_util.flatten_dict(expected["adapter"], sep="/")
        bad = sorted(set(want) ^ set(flat)) + sorted(k for k in set(want) & set(flat)
                                                    if tuple(want[k].shape) != flat[k].shape)
        if bad:
            raise ValueError(f"{path}/cond_encoder does not match codi.json's adapted config: {bad[:10]}")
        # float32 master weights, as models.load gives the other components (files may be float16).
        params["adapter"] = traverse_util.unflatten_dict(
            {k: jnp.asarray(v, want[k].dtype) for k, v in flat.items()}, sep="/")
    if student.guidance_input:
        from safetensors.numpy import load_file

        kernel = load_file(os.path.join(path, "guidance", "w_embed.safetensors"))["kernel"]
        if kernel.ndim != 2 or kernel.shape[1] != config["cond_channels"]:
            raise ValueError(f"{path}/guidance/w_embed.safetensors: kernel of shape {kernel.shape}, "
                             f"expected (features, {config['cond_channels']}) (the condition's channels)")
        params["w_embed"] = {"kernel": jnp.asarray(kernel, jnp.float32)}
    return student, params, student.aux_params(), int(meta["grid"])
