"""Every data option with its default (``default_config``).

Kept free of TensorFlow so configs can be built and printed without importing it.
"""
from __future__ import annotations

import ml_collections

TASKS = ("sr", "depth", "inpaint", "edit", "canny", "unconditional")


def _sr_config() -> ml_collections.ConfigDict:
    """Real-ESRGAN second-order degradation.

    Every range and probability below is the default of Real-ESRGAN's x4 training recipe
    (Wang et al. 2021, "Real-ESRGAN", §3 and options/train_realesrnet_x4plus.yml of the
    xinntao/Real-ESRGAN repository). Noise levels are in 8-bit units (divided by 255 at use).
    """
    c = ml_collections.ConfigDict()
    c.scale = 4  # target side / low-resolution side
    # realesrgan (the chain below) | bicubic (a clean antialiased downscale, the classic benchmark)
    c.degradation = "realesrgan"
    # Blur kernels: odd sizes from 7 to 21, drawn uniformly; one kernel family per draw.
    c.kernel_range = (7, 21)
    c.kernel_list = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
    c.kernel_prob = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    # First stage.
    c.sinc_prob = 0.1
    c.blur_sigma = (0.2, 3.0)
    c.betag_range = (0.5, 4.0)
    c.betap_range = (1.0, 2.0)
    c.resize_prob = (0.2, 0.7, 0.1)  # up, down, keep
    c.resize_range = (0.15, 1.5)
    c.gaussian_noise_prob = 0.5
    c.noise_range = (1.0, 30.0)
    c.poisson_scale_range = (0.05, 3.0)
    c.gray_noise_prob = 0.4
    c.jpeg_range = (30, 95)
    # Second stage.
    c.second_blur_prob = 0.8
    c.sinc_prob2 = 0.1
    c.blur_sigma2 = (0.2, 1.5)
    c.betag_range2 = (0.5, 4.0)
    c.betap_range2 = (1.0, 2.0)
    c.resize_prob2 = (0.3, 0.4, 0.3)
    c.resize_range2 = (0.3, 1.2)
    c.gaussian_noise_prob2 = 0.5
    c.noise_range2 = (1.0, 25.0)
    c.poisson_scale_range2 = (0.05, 2.5)
    c.gray_noise_prob2 = 0.4
    c.jpeg_range2 = (30, 95)
    # Final stage: sinc filter (else identity) around the resize to the LR size, and JPEG,
    # in random order (50/50).
    c.final_sinc_prob = 0.8
    return c


def _inpaint_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Fraction of the image to mask, drawn uniformly per example; the mask is thresholded to hit it.
    c.coverage = (0.1, 0.5)
    c.stroke_prob = 0.5  # free-form strokes, else boxes
    c.max_strokes = 4
    c.max_vertices = 6
    c.max_boxes = 3
    return c


def _canny_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Hysteresis thresholds on the Sobel gradient magnitude of 0..255 luminance; 100/200 is what the
    # public CoDi/ControlNet canny demos pass to cv2.Canny.
    c.low_threshold = 100.0
    c.high_threshold = 200.0
    c.sigma = 0.0  # Gaussian pre-blur (cv2.Canny applies none)
    c.channels = 3  # 3 = edge map replicated, the layout ControlNet-style hint encoders expect
    return c


def _depth_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.channels = 3  # 3 = depth replicated, the layout ControlNet-style hint encoders expect
    return c


def _demo_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.train_crops_per_image = 128
    c.eval_crops_per_image = 8
    # Right-most fraction of each image's columns is held out: eval crops come only from there,
    # training crops only from the rest, so the two splits never share a pixel.
    c.eval_fraction = 0.25
    # The depth-only splits (the motorcycle pair) get this many times more crops per image.
    c.depth_crop_multiplier = 8
    return c


def _embedded_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Each natural training picture appears this many times per epoch (a fresh crop each time).
    c.natural_repeats = 64
    c.procedural_train = 768  # dead-leaves pictures in the train split (seeds 0..n-1)
    c.procedural_size = 128  # their side in pixels (at least the crop size)
    # Fraction of the train pictures' palette colours drawn from the whole RGB cube (saturated);
    # 0 keeps the pictures every shipped model was trained on. The eval_procedural split never has any.
    c.procedural_vivid = 0.0
    # Smooth colour fields (procedural.smooth_field, colours anywhere in the RGB cube) appended to
    # the train split after the dead leaves; 0 keeps the train split every shipped model saw.
    c.procedural_smooth = 0
    c.eval_crops_per_image = 32  # fixed crops of each held-out picture
    c.procedural_eval = 64  # held-out procedural pictures (the eval_procedural split)
    return c


def _augment_config() -> ml_collections.ConfigDict:
    """On-the-fly augmentation of training crops (the defaults leave crops as they are)."""
    c = ml_collections.ConfigDict()
    c.rot90 = False  # a random multiple of 90 degrees
    # The picture is shrunk by a factor drawn uniformly from this range before cropping (never
    # enlarged: an upsampled target would teach blur). (1.0, 1.0) = off.
    c.scale_range = (1.0, 1.0)
    # Brightness, contrast and saturation factors drawn from [1 - j, 1 + j]; 0 = off. Not applied
    # to the edit task, whose target is a function of its input's colours.
    c.color_jitter = 0.0
    # A random permutation of the RGB channels (same exceptions as color_jitter), for colours the
    # training pictures lack. Measured in codi_jax/assets/mini_sd/README.md and configs/sr.py:
    # it helped neither the shipped autoencoder nor the SR student.
    c.channel_permute = False
    return c


def _folder_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.image_dir = "images"  # targets; the folder itself when this subfolder does not exist
    c.cond_dir = "conditions"  # paired inputs (edit: the image before the edit), same relative stem
    c.depth_dir = "depth"  # depth maps (.png 8/16-bit, .tif, .npy), same relative stem
    c.captions = "captions.jsonl"  # lines of {"file": <relative path or stem>, "text": ...}
    return c


def _tfds_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.image_key = "image"  # the target image feature, e.g. "hr" for div2k
    # Feature holding the depth map (depth task) or the image before the edit (edit task).
    c.cond_key = ""  # empty = "depth" for depth, "input_image" for edit
    c.text_key = ""  # caption / instruction feature; empty = none
    return c


def default_config(task: str = "sr") -> ml_collections.ConfigDict:
    """All data options for ``task`` (one of ``TASKS``) with their defaults.

    ``source`` is ``"embedded"`` (whole pictures shipped with scikit-image/scikit-learn, held out by
    picture, plus procedural pictures; see ``codi_jax.data.embedded``), ``"demo"`` (the older
    crop dataset of the same pictures, held out by column strip),
    ``"tfds:<name>"`` (e.g. ``tfds:div2k/bicubic_x4``; read from ``data_dir`` or ``$TFDS_DATA_DIR``)
    or ``"folder:<path>"``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown data task {task!r}; known tasks: {', '.join(TASKS)}")
    c = ml_collections.ConfigDict()
    c.task = task
    c.source = "demo"
    c.seed = 0  # the training data's order and random augmentations / degradations
    # TFDS data dir. None: $TFDS_DATA_DIR for tfds sources; ~/.cache/codi_jax/tensorflow_datasets
    # for the demo (built there on first use).
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.train_split = "train"
    c.eval_split = "eval"  # the demo's held-out split; e.g. "validation" for TFDS datasets
    c.image_size = 32  # side of the square crops the model sees (SD presets: 512)
    # Shrink images whose short side is larger than this before cropping (0 = keep the native
    # resolution and take crops from it). Never upsamples: smaller images are skipped.
    c.resize_short_side = 0
    c.augment = _augment_config()
    c.random_flip = True  # horizontal flip of training examples (jointly with their condition)
    c.strict = False  # True: a bad file is an error instead of being skipped and counted
    # True: grayscale, RGBA (composited on white), palette and 16-bit images are converted to 8-bit
    # RGB and counted; False: they are treated as bad files.
    c.convert_modes = True
    c.max_bad_in_a_row = 64  # consecutive bad records before giving up on the source
    c.tokenizer = ml_collections.FieldReference(None, field_type=str)  # CLIP tokenizer folder
    c.max_text_length = 77
    c.eval_seed = 0  # degradations/masks of the eval split depend only on this and the index
    c.num_parallel_calls = -1  # -1 = tf.data.AUTOTUNE
    c.prefetch_batches = 2
    c.sr = _sr_config()
    c.inpaint = _inpaint_config()
    c.canny = _canny_config()
    c.depth = _depth_config()
    c.demo = _demo_config()
    c.embedded = _embedded_config()
    c.folder = _folder_config()
    c.tfds = _tfds_config()
    return c


def cond_channels(cfg: ml_collections.ConfigDict) -> int:
    """Channels of the ``cond`` array for ``cfg.task``."""
    return {
        "sr": 3,
        "depth": cfg.depth.channels,
        "inpaint": 4,  # masked image (3) + mask (1, 1 = hole)
        "edit": 3,
        "canny": cfg.canny.channels,
        "unconditional": 3,  # the target itself, never read (pretraining)
    }[cfg.task]

