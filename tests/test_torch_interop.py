"""The PyTorch world runs what codi_jax exports: on a tiny random text-to-image SD pipeline, a
PE-CoDi export (hint-stem ControlNet) in diffusers' ``StableDiffusionControlNetPipeline`` and
every adapter in ``codi_jax.torch.CoDiPipeline`` equal ``codi_jax.predict`` at 1 and 4 steps
within 1e-3 (pixels in [0, 1])."""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import config_lib, export, predict
from codi_jax.models.adapters import init_adapted_params
from codi_jax.modeling import adapted_config, load_teacher, make_student, with_guidance_input
from tiny import write_tiny_tokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.parity

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "parity")
SIZE = 16  # pixels; the fixture VAE downsamples 2x, so 8x8x4 latents
PROMPT = "a cat"
TOLERANCE = 1e-3


def _randomize(model, seed: int) -> None:
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "make_parity_fixtures.py")
    spec = importlib.util.spec_from_file_location("make_parity_fixtures", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool._randomize(model, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    """A v-prediction SD-layout pipeline: random UNet with cross-attention, the parity fixtures'
    VAE and CLIP text encoder, a tiny tokenizer, SD's scaled_linear schedule."""
    root = tmp_path_factory.mktemp("tiny_sd")
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, attention_head_dim=4, cross_attention_dim=32, norm_num_groups=4)
    _randomize(unet, 0)
    unet.save_pretrained(root / "unet")
    shutil.copytree(os.path.join(FIXTURES, "vae"), root / "vae", ignore=shutil.ignore_patterns("reference.npz"))
    shutil.copytree(os.path.join(FIXTURES, "clip"), root / "text_encoder", ignore=shutil.ignore_patterns("reference.npz"))
    write_tiny_tokenizer(root / "tokenizer")
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="v_prediction").save_pretrained(root / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return str(root)


def _export(teacher_folder: str, out: str, adapter: str, cond_input: str, guidance: bool = False) -> str:
    """A CoDi student of the teacher, its adapter perturbed off its identity initialisation (μ,
    zero convs), written by ``codi_jax.export.export``; ``guidance``: guidance-aware, with a random
    w embedding, sampling at w = 2 by default."""
    cfg = config_lib.task_config("sr")
    cfg.data.image_size = SIZE
    m = cfg.model
    m.pretrained, m.adapter, m.cond_input, m.hint_channels = teacher_folder, adapter, cond_input, (8, 16)
    teacher = load_teacher(m, jax.random.PRNGKey(0))
    config = adapted_config(m, teacher, cond_channels=3)
    student = make_student(m, teacher, config)
    params = init_adapted_params(config, teacher.unet_params, jax.random.PRNGKey(1))
    leaves, tree = jax.tree_util.tree_flatten(params["adapter"])
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    params["adapter"] = jax.tree_util.tree_unflatten(tree, leaves)
    if adapter == "cond_encoder":
        params["adapter"]["mu"] = jnp.asarray(0.4, jnp.float32)
    if guidance:
        student, params = with_guidance_input(student, params, 2.0)
        params["w_embed"]["kernel"] = 0.1 * jax.random.normal(jax.random.PRNGKey(3), params["w_embed"]["kernel"].shape)
    return export.export(student, params, out, cfg)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    cond = np.stack([0.8 * x - 0.4, 0.6 * y - 0.2, 0.5 * x * y], -1) + 0.1 * rng.standard_normal((SIZE, SIZE, 3))
    return np.clip(cond, -1, 1).astype(np.float32)


def _ours(folder: str, cond: np.ndarray, steps: int, guidance: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``codi_jax.predict``'s output (HxWx3 in [0, 1]) and its initial noise (NCHW)."""
    p = predict.load_predictor(folder, guidance)
    out = predict.predict(p, cond, steps, seed=0, tile=SIZE, overlap=0, batch=1, prompt=PROMPT)
    noise = predict.initial_noise(0, (SIZE // p.factor, SIZE // p.factor, 4))
    return (out + 1.0) / 2.0, np.transpose(noise, (2, 0, 1))[None]


def _nchw(image: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(image, (2, 0, 1))[None]))


@pytest.mark.parametrize("adapter, cond_input", [("cond_encoder", "latent"), ("cond_encoder", "pixel"),
                                                  ("controlnet", "latent"), ("controlnet", "pixel")])
def test_codi_pipeline_equals_predict(teacher_folder, inputs, tmp_path, adapter, cond_input):
    from codi_jax.torch import CoDiPipeline

    folder = _export(teacher_folder, str(tmp_path / "export"), adapter, cond_input)
    pipe = CoDiPipeline.from_export(folder)
    for steps in (1, 4):
        ours, noise = _ours(folder, inputs, steps)
        theirs = pipe(_nchw(inputs), torch.from_numpy(noise), steps, prompt=PROMPT)[0].permute(1, 2, 0).numpy()
        assert np.abs(theirs - ours).max() <= TOLERANCE, (steps, np.abs(theirs - ours).max())
        assert ours.std() > 0.01  # a picture, not a constant


@pytest.mark.parametrize("adapter, cond_input", [("cond_encoder", "latent"), ("controlnet", "pixel")])
def test_guidance_aware_export_equals_predict(teacher_folder, inputs, tmp_path, adapter, cond_input):
    """The w input (added to the condition) in PyTorch: the export's own w and another one."""
    from codi_jax.torch import CoDiPipeline
    from codi_jax.torch.codi import pipeline_kwargs

    folder = _export(teacher_folder, str(tmp_path / "export"), adapter, cond_input, guidance=True)
    pipe = CoDiPipeline.from_export(folder)
    outputs = {}
    for w in (None, 5.0):
        ours, noise = _ours(folder, inputs, 2, guidance=w)
        theirs = pipe(_nchw(inputs), torch.from_numpy(noise), 2, prompt=PROMPT, guidance=w)[0].permute(1, 2, 0).numpy()
        assert np.abs(theirs - ours).max() <= TOLERANCE, (w, np.abs(theirs - ours).max())
        outputs[w] = ours
    assert np.abs(outputs[None] - outputs[5.0]).max() > 1e-3   # w changes the picture
    with pytest.raises(ValueError, match="guidance-aware"):
        pipeline_kwargs(folder, 4)


def test_pe_codi_runs_in_diffusers_controlnet_pipeline(teacher_folder, inputs, tmp_path):
    from codi_jax.torch import grid_timesteps
    from codi_jax.torch.codi import pipeline_kwargs

    folder = _export(teacher_folder, str(tmp_path / "export"), "controlnet", "pixel")
    # As the export's README says: the folder is a diffusers ControlNet pipeline as it stands.
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 4):
        ours, noise = _ours(folder, inputs, steps)
        theirs = pipe(PROMPT, image=_nchw((inputs + 1.0) / 2.0), latents=torch.from_numpy(noise), height=SIZE,
                      width=SIZE, output_type="np", **pipeline_kwargs(folder, steps)).images[0]
        assert pipe.scheduler.timesteps.tolist() == grid_timesteps(steps, 20)
        assert 'timestep_spacing=\"trailing\"' in open(os.path.join(folder, "README.md")).read()
        assert np.abs(theirs - ours).max() <= TOLERANCE, (steps, np.abs(theirs - ours).max())
    with pytest.raises(ValueError, match="divide the teacher grid"):
        pipeline_kwargs(folder, 8)


def test_grid_timesteps_are_codi_samplers():
    from codi_jax.diffusion import timesteps
    from codi_jax.torch import grid_timesteps

    for steps in (1, 2, 4, 8):
        assert grid_timesteps(steps, 20) == [int(round(t * 1000)) - 1 for t in timesteps(steps, 20)[:-1]]
    with pytest.raises(ValueError, match="do not fit"):
        grid_timesteps(21, 20)


def test_lora_file_loads_in_diffusers_and_equals_the_merged_unet(teacher_folder, tmp_path):
    """A LoRA run's export: diffusers' ``load_lora_weights`` on the teacher's pipeline with
    ``lora/`` gives the UNet output of the exported (merged) ``unet/`` to 1e-4 — attention
    projections and convolutions, factors moved off their B = 0 start."""
    pytest.importorskip("peft")
    from codi_jax.models import lora

    cfg = config_lib.task_config("sr")
    cfg.data.image_size = SIZE
    cfg.model.pretrained, cfg.model.adapter, cfg.model.lora_rank = teacher_folder, "none", 2
    teacher = load_teacher(cfg.model, jax.random.PRNGKey(0))
    student = make_student(cfg.model, teacher, adapted_config(cfg.model, teacher, cond_channels=3))
    params = lora.add_lora({"unet": teacher.unet_params}, 2, jax.random.PRNGKey(1), modules=("unet",), convs=True)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.05 * jax.random.normal(jax.random.PRNGKey(len(path)), v.shape)
        if path[-1].key == "lora_B" else v, params)
    folder = export.export(student, params, str(tmp_path / "export"), cfg)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        teacher_folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(os.path.join(folder, "lora"))
    rng = np.random.default_rng(3)
    z = rng.standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(z.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                           encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
    from codi_jax import models

    unet, merged = models.load(folder, "unet")
    ours = np.asarray(unet.apply({"params": merged}, z, t, ctx))
    base = np.asarray(unet.apply({"params": teacher.unet_params}, z, t, ctx))
    assert np.abs(ours - base).max() > 1e-2       # the LoRA changes the function
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_guided_flash_trains_on_a_text_teacher(teacher_folder, tmp_path):
    """The trainer's guidance-aware Flash on a conditional export of a teacher that reads text,
    whose classifier-free guidance drops the prompt (``train.empty_prompt_context``, which guided
    CoDi's unconditional branch shares; CoDi's mode is trained in tests/test_guidance.py): it
    trains (a non-finite step would stop the run) and the w embedding, zero at the start, moves."""
    from codi_jax import train
    from test_train import _checkpoint

    cfg = config_lib.task_config("sr", "flash,guided")
    cfg.model.conditional_teacher = _export(teacher_folder, str(tmp_path / "teacher"), "cond_encoder", "latent")
    cfg.data.image_size, cfg.train.batch_size, cfg.train.warmup_steps = SIZE, 8, 1
    # Four steps: the w embedding gets its first gradient once the lr left 0.
    cfg.train.num_steps, cfg.train.checkpoint_every, cfg.eval.num_examples, cfg.export = 4, 4, 0, False
    cfg.flash.num_timesteps, cfg.flash.teacher_steps = 8, 2
    train.train_and_evaluate(cfg, str(tmp_path / "flash"))
    assert np.abs(np.asarray(_checkpoint(str(tmp_path / "flash"), 4)["params"]["w_embed"]["kernel"])).max() > 0
